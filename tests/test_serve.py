"""`anyclass serve`: the app's handlers say what the CLI says (same messages, same rows),
keep two users apart, and the page works in a real browser (headless Debian chromium via
selenium) on the mini world with the built-in model."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from anyclass.cli.main import main
from anyclass.errors import AnyclassError
from anyclass.serve.handlers import Service

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(mini_world):
    return mini_world


@pytest.fixture(scope="module")
def service(world, tmp_path_factory):
    s = Service("builtin", runs=tmp_path_factory.mktemp("runs"))
    yield s
    s.close()


def _task(world) -> str:
    return "objects" if "objects" in world.tasks else next(iter(world.tasks))


def _test_images(world, n: int, task: str | None = None) -> tuple[list[str], list[str]]:
    """n test images of distinct classes of a task, and the task's class names."""
    from anyclass.data.sources import load_dataset
    ds = load_dataset(f"world:{task or _task(world)}", "test")
    first = {}
    for p, y in zip(ds.paths, ds.labels):
        first.setdefault(y, p)
    return list(first.values())[:n], list(ds.classnames)


def _cli(args: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(args)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# ------------------------------------------------------------------ same words as the CLI

@pytest.mark.parametrize("classes", ["", " , ", "cat", "cat,dog,Cat", "dog\n\nDog "])
def test_bad_class_lists_get_the_cli_message(world, service, capsys, classes):
    imgs, _ = _test_images(world, 1)
    with pytest.raises(AnyclassError) as e:
        service.classify(imgs, classes)
    rc, _, err = _cli(["classify", *imgs, "--classes", classes], capsys)
    assert rc == 2 and err == f"error: {e.value}\n"
    assert "\n" not in str(e.value)


def test_no_image_gets_the_cli_message(world, service, tmp_path, capsys):
    with pytest.raises(AnyclassError) as e:
        service.classify([], "cat, dog")
    rc, _, err = _cli(["classify", str(tmp_path), "--classes", "cat, dog"], capsys)
    assert rc == 2 and err == f"error: {e.value}\n"


def test_bad_uploads_get_the_cli_lines_and_good_ones_its_rows(world, service, tmp_path,
                                                             capsys):
    imgs, names = _test_images(world, 2)
    classes = ", ".join(names)
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    huge = tmp_path / "huge.png"     # 8200 x 8200 = 67.2 M pixels > the 64 M guard, 10 kB
    Image.new("1", (8200, 8200)).save(huge)
    files = [imgs[0], str(notes), str(huge), imgs[1], str(empty)]
    res = service.classify(files, classes, top_k=3)
    rc, out, err = _cli(["classify", *files, "--classes", classes, "--top-k", "3", "--json"],
                        capsys)
    assert rc == 0
    assert res.rows == json.loads(out)
    assert [r["image"] for r in res.rows] == imgs
    assert len(res.skipped) == 3 and all("\n" not in s for s in res.skipped)
    for line, name in zip(res.skipped, ("notes.txt", "huge.png", "empty.png")):
        assert name in line and f"warning: {line}\n" in err
    assert "exceeds the limit" in res.skipped[1]
    only_bad = service.classify([str(notes)], classes)
    assert only_bad.rows == [] and only_bad.skipped == res.skipped[:1]


def test_two_users_at_once_get_their_own_results(world, service):
    """Different images and class lists from two threads at the same moment: each gets what
    it gets alone."""
    tasks = [t for t in world.tasks if t != "source"][:2]
    jobs = []
    for t in tasks:
        imgs, names = _test_images(world, 3, t)
        jobs.append((imgs, ", ".join(names)))
    alone = [service.classify(i, c, top_k=2).rows for i, c in jobs]
    assert alone[0] != alone[1]
    out: dict[int, list] = {}
    barrier = threading.Barrier(len(jobs))

    def user(k: int) -> None:
        barrier.wait()
        for _ in range(3):
            out.setdefault(k, []).append(service.classify(*jobs[k], top_k=2).rows)

    threads = [threading.Thread(target=user, args=(k,)) for k in range(len(jobs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    for k in range(len(jobs)):
        assert out[k] == [alone[k]] * 3


def test_downloads_live_in_their_own_folders(service):
    a, b = service.write_json([{"image": "a.png"}]), service.write_json([{"image": "b.png"}])
    assert a.parent != b.parent and a.parent.parent == b.parent.parent == service.scratch
    assert json.loads(a.read_text()) == [{"image": "a.png"}]


# ------------------------------------------------------------------ other methods, tabs

def test_tip_adapter_over_a_support_folder(world, service, tmp_path):
    """A plain class folder (no val split): Tip-Adapter's fixed α, β; typed classes are
    matched to folder names whatever their case, spaces or order."""
    from anyclass.data.sources import load_dataset
    task = _task(world)
    train = load_dataset(f"world:{task}", "train")
    names = list(train.classnames)[:3]
    for y, p in zip(train.labels, train.paths):
        if y < 3:
            d = tmp_path / "support" / names[y].upper().replace(" ", "_")
            d.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, d)
    imgs, _ = _test_images(world, 2)
    res = service.classify(imgs, ", ".join(reversed(names)), method="tip-adapter",
                           support=str(tmp_path / "support"), top_k=3)
    assert len(res.rows) == 2 and res.info["chosen"]["searched"] is False
    assert {t["class"] for t in res.rows[0]["top"]} == set(names)
    with pytest.raises(AnyclassError, match="has no image in the"):
        service.classify(imgs, ", ".join(names + ["kazoo"]), method="tip-adapter",
                         support=str(tmp_path / "support"))
    with pytest.raises(AnyclassError, match="has no images of these classes"):
        service.classify(imgs, "kazoo, ocarina", method="tip-adapter",
                         support=str(tmp_path / "support"))
    with pytest.raises(AnyclassError, match="not a directory"):
        service.classify(imgs, "kazoo, ocarina", method="tip-adapter",
                         support=str(tmp_path / "nowhere"))


def test_sus_x_over_the_world_pool(world, service):
    imgs, names = _test_images(world, 2)
    res = service.classify(imgs, ", ".join(names), method="sus-x", pool="world:pool", top_k=2)
    assert [r["image"] for r in res.rows] == imgs
    assert res.info["pool"] == "world:pool" and res.info["support_images"] >= len(names)
    with pytest.raises(AnyclassError, match="retrieval needs a pool"):
        service.classify(imgs, ", ".join(names), method="sus-x", pool=" ")


def test_hub_tab_matches_hub_select(world, service, capsys):
    classes = "dog, cat, car, pizza, tulip"
    sel = service.hub_select(classes)
    rc, out, _ = _cli(["hub", "select", "--classes", classes, "--json"], capsys)
    cli = json.loads(out)
    assert rc == 0 and sel["fallback"] == cli["fallback"]
    assert len(sel["models"]) == len(cli["models"])
    assert {r["class"]: r["head"] for r in sel["rows"] if r["head"] is not None} == \
        {c: v["head"] for c, v in cli["choices"].items()}
    look = service.hub_lookup("dog")
    assert look["synset"] == "dog.n.01" and look["definition"]
    assert look["heads"] == sorted(look["heads"], key=lambda h: -h["score"])
    with pytest.raises(AnyclassError):
        service.hub_select("dog")                     # one class: the CLI's message
    with pytest.raises(AnyclassError):
        service.hub_lookup("  ")


def _fake_result(ds: str, method: str, acc: float) -> dict:
    return {"dataset": ds, "backbone": "builtin", "method": method, "shots": 0, "seed": 1,
            "metrics": {"acc1": acc, "acc5": 1.0, "mean_per_class_recall": acc},
            "num_classes": 10, "chance_acc1": 0.1}


def test_results_tab_is_anyclass_report(service, capsys):
    runs = service.runs
    (runs / "a").mkdir()
    for i, (ds, m, acc) in enumerate([("world:objects", "zeroshot", 0.5),
                                      ("world:animals", "zeroshot", 0.25),
                                      ("world:objects", "tip-adapter", 0.75)]):
        (runs / "a" / f"r{i}.json").write_text(json.dumps(_fake_result(ds, m, acc)))
    assert service.result_folders() == [".", "a"]
    text, plots = service.results("a")
    rc, out, _ = _cli(["report", str(runs / "a")], capsys)
    assert rc == 0 and out == text + "\n"
    assert [p.name for p in plots] == ["plot_eval.png"] and plots[0].stat().st_size > 1000
    with pytest.raises(AnyclassError, match="not inside the results folder"):
        service.results("../..")
    (runs / "empty").mkdir()
    with pytest.raises(AnyclassError, match="no result files found"):
        service.results("empty")


def test_backbone_is_built_once_for_all_requests(monkeypatch):
    import anyclass.backbones.factory as factory
    calls = []

    def build(spec, device=None):
        calls.append(spec)
        time.sleep(0.2)                        # long enough for the threads to overlap
        return object()

    monkeypatch.setattr(factory, "create_backbone", build)
    s = Service("builtin")
    try:
        assert calls == []                     # lazily: not at start-up
        got = []
        threads = [threading.Thread(target=lambda: got.append(s.backbone())) for _ in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert calls == ["builtin"] and len({id(b) for b in got}) == 1
    finally:
        s.close()


def test_serve_without_gradio_says_how_to_install(monkeypatch, capsys):
    import anyclass.cli.serve as cli_serve
    monkeypatch.setattr(cli_serve.importlib.util, "find_spec", lambda name: None)
    rc, _, err = _cli(["serve", "--port", "8765"], capsys)
    assert rc == 2 and "pip install 'anyclass[app]'" in err


# ------------------------------------------------------------------ a real browser

def _browser_tools():
    """chromium, chromedriver and selenium, or a failure saying how to get them: `make test`
    installs all three, so their absence is a broken set-up, not a reason to skip."""
    how = ("run `make test` (it installs them) or: apt-get install chromium chromium-driver "
           "&& pip install -e '.[test,app]'")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.fail(f"the browser test needs Debian's chromium and chromium-driver "
                    f"(found chromium={chromium}, chromedriver={driver}): {how}", pytrace=False)
    try:
        import gradio  # noqa: F401
        import selenium  # noqa: F401
    except ImportError as e:
        pytest.fail(f"the browser test needs {e.name}: {how}", pytrace=False)
    return chromium, driver


def test_a_missing_browser_fails_the_test_not_skips_it(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(pytest.fail.Exception, match="apt-get install chromium"):
        _browser_tools()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(world, tmp_path_factory):
    """`anyclass serve` in a subprocess on a free loopback port; its URL."""
    _browser_tools()
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "anyclass.cli.main", "serve",
                                 "--backbone", "builtin", "--port", str(port),
                                 "--runs", str(tmp_path_factory.mktemp("runs"))],
                                stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"anyclass serve exited ({proc.returncode}):\n{log.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"anyclass serve did not answer in 90 s:\n{log.read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser(server):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService
    chromium, driver = _browser_tools()
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--window-size=1400,1100", "--lang=en-US"):
        opts.add_argument(a)
    d = webdriver.Chrome(service=DriverService(driver), options=opts)
    try:
        yield d
    finally:
        d.quit()


def test_page_classifies_like_the_cli(world, server, browser, capsys):
    """Upload world images, type the classes, click: the page's top-1 per image is the
    CLI's; a one-class list shows the CLI's message in the status box. Screenshot under
    runs/serve/ (docs/img/serve.png is a copy)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    t0 = time.monotonic()
    imgs, names = _test_images(world, 3)
    classes = ", ".join(names)
    d = browser
    d.get(server)
    wait = WebDriverWait(d, 60)
    box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#classes textarea"))
    status = d.find_element(By.CSS_SELECTOR, "#status textarea")
    d.find_element(By.CSS_SELECTOR, "#images input[type=file]").send_keys("\n".join(imgs))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#images tbody tr"))
               == len(imgs))

    box.send_keys("cat")                                           # bad input first
    d.find_element(By.ID, "classify").click()
    rc, _, err = _cli(["classify", imgs[0], "--classes", "cat"], capsys)
    assert rc == 2
    wait.until(lambda d: status.get_attribute("value"))
    assert f"error: {status.get_attribute('value')}\n" == err

    box.clear()
    box.send_keys(classes)
    d.find_element(By.ID, "classify").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".anyclass-top")) == len(imgs))
    shown = {}
    for card in d.find_elements(By.CSS_SELECTOR, ".anyclass-top"):
        name = card.find_element(By.CSS_SELECTOR, "[data-testid=block-label]").text.strip()
        shown[name] = card.find_element(By.CSS_SELECTOR,
                                        "[data-testid=label-output-value]").text.strip()
    rc, out, _ = _cli(["classify", *imgs, "--classes", classes, "--json"], capsys)
    assert rc == 0
    cli = [{**r, "image": Path(r["image"]).name} for r in json.loads(out)]
    assert shown == {r["image"]: r["top"][0]["class"] for r in cli}
    assert status.get_attribute("value") == f"{len(imgs)} image(s) classified (zeroshot)"
    link = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#download a[download]"))
    assert link.get_attribute("download") == "anyclass-classify.json"
    with urllib.request.urlopen(link.get_attribute("href"), timeout=10) as r:
        assert json.loads(r.read()) == cli        # the download: the CLI's rows, file names

    out_dir = REPO / "runs" / "serve"
    out_dir.mkdir(parents=True, exist_ok=True)
    height = d.execute_script("return document.documentElement.scrollHeight")
    d.set_window_size(1400, max(1100, height + 200))      # the whole page in one picture
    d.execute_script("window.scrollTo(0, 0)")
    d.save_screenshot(str(out_dir / "serve.png"))
    assert (out_dir / "serve.png").stat().st_size > 10_000
    assert time.monotonic() - t0 < 60
