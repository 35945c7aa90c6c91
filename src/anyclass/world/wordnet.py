"""WordNet 3.0 from Debian, read by nltk, and the concept → noun synset mapping.

Debian ships WordNet in /usr/share/wordnet (wordnet-base, wordnet-sense-index) but nltk only
reads a corpus that sits in `<dir>/corpora/wordnet/` with `<dir>` on `nltk.data.path`, and it
needs a `lexnames` file Debian omits. We copy the files into `$ANYCLASS_HOME/nltk_data` and
write `lexnames` ourselves; nothing here ever touches the network (no `nltk.download`).
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import AnyclassError
from ..paths import home

DEBIAN_WORDNET = Path("/usr/share/wordnet")

# Files nltk's WordNetCorpusReader opens (lexnames is written, not copied).
_WN_FILES = ("adj.exc", "adv.exc", "noun.exc", "verb.exc", "cntlist", "cntlist.rev",
             "data.adj", "data.adv", "data.noun", "data.verb",
             "index.adj", "index.adv", "index.noun", "index.verb", "index.sense")

# The 45 standard lexicographer files of WordNet 3.0 (lexnames(5WN)): number, name, pos.
LEXNAMES = (
    "adj.all 3", "adj.pert 3", "adv.all 4", "noun.Tops 1", "noun.act 1", "noun.animal 1",
    "noun.artifact 1", "noun.attribute 1", "noun.body 1", "noun.cognition 1",
    "noun.communication 1", "noun.event 1", "noun.feeling 1", "noun.food 1", "noun.group 1",
    "noun.location 1", "noun.motive 1", "noun.object 1", "noun.person 1",
    "noun.phenomenon 1", "noun.plant 1", "noun.possession 1", "noun.process 1",
    "noun.quantity 1", "noun.relation 1", "noun.shape 1", "noun.state 1", "noun.substance 1",
    "noun.time 1", "verb.body 2", "verb.change 2", "verb.cognition 2",
    "verb.communication 2", "verb.competition 2", "verb.consumption 2", "verb.contact 2",
    "verb.creation 2", "verb.emotion 2", "verb.motion 2", "verb.perception 2",
    "verb.possession 2", "verb.social 2", "verb.stative 2", "verb.weather 2", "adj.ppl 3",
)


def nltk_data_dir() -> Path:
    """`$ANYCLASS_HOME/nltk_data`, holding `corpora/wordnet/` once `install_wordnet` ran."""
    return home() / "nltk_data"


def install_wordnet(source: Path = DEBIAN_WORDNET) -> Path:
    """Link Debian's WordNet into nltk's layout (idempotent, atomic); return the corpus dir."""
    target = nltk_data_dir() / "corpora" / "wordnet"
    if (target / "lexnames").exists():
        return target
    missing = [f for f in _WN_FILES if not (source / f).exists()]
    if missing:
        raise AnyclassError(
            f"WordNet files missing from {source} ({', '.join(missing)}): install the Debian "
            "packages wordnet-base and wordnet-sense-index")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".wordnet-", dir=target.parent))
    try:
        for f in _WN_FILES:
            # a copy (36 MB): nltk refuses symlinks leaving its root and hard-linked files
            shutil.copyfile(source / f, tmp / f)
        (tmp / "lexnames").write_text(
            "".join(f"{i:02d}\t{e.split()[0]}\t{e.split()[1]}\n" for i, e in enumerate(LEXNAMES)))
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race: theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists() and tmp != target:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@lru_cache(maxsize=1)
def get_wordnet() -> Any:
    """nltk's `wordnet` corpus reader over Debian's WordNet 3.0 (loaded once per process)."""
    install_wordnet()
    import nltk

    d = str(nltk_data_dir())
    if d not in nltk.data.path:
        nltk.data.path.append(d)
    from nltk.corpus import wordnet as wn

    wn.ensure_loaded()
    return wn


# ---------------------------------------------------------------------------------------------
# Concept → synset

# Lexicographer files of things one can draw; preferred over abstract senses (e.g. "ring" the
# jewellery band over "ring" the sound).
_DEPICTABLE = {"noun.animal", "noun.artifact", "noun.food", "noun.plant", "noun.object",
               "noun.person", "noun.body", "noun.phenomenon", "noun.shape", "noun.substance"}

# Words that name the emoji's frame, not its content: never a head noun by themselves.
_FRAME_WORDS = {"button", "sign", "symbol", "mark", "type", "letter", "capital", "small",
                "squared", "negative", "black", "white", "with", "and", "of", "the", "a"}

# Curated fixes: emoji (codepoint) → synset where name-based lookup fails or picks a wrong
# sense. Kept small; every entry was checked against WordNet 3.0 glosses.
CURATED: dict[int, str] = {
    0x1F48D: "ring.n.08",          # ring (jewellery)
    0x1F4A1: "light_bulb.n.01",    # light bulb
    0x1F3C0: "basketball.n.02",    # basketball (the ball)
    0x26BD: "soccer_ball.n.01",    # soccer ball
    0x26BE: "baseball.n.02",       # baseball (the ball)
    0x1F3C8: "football.n.02",      # american football
    0x1F3C9: "football.n.02",      # rugby football
    0x1F3BE: "tennis_ball.n.01",   # tennis
    0x1F3D0: "volleyball.n.02",    # volleyball
    0x1F3B3: "bowling_ball.n.01",  # bowling
    0x1F3D3: "table_tennis.n.01",  # ping pong
    0x1F3F8: "badminton.n.01",     # badminton
    0x1F3D2: "ice_hockey.n.01",    # ice hockey
    0x1F3D1: "field_hockey.n.01",  # field hockey
    0x1F3CF: "cricket.n.02",       # cricket game
    0x1F94A: "boxing_glove.n.01",  # boxing glove
    0x26F3: "golf.n.01",           # flag in hole
    0x1F3A3: "fishing_rod.n.01",   # fishing pole
    0x1F3BF: "ski.n.01",           # skis
    0x1F6F7: "sled.n.01",          # sled
    0x1F94C: "curling.n.01",       # curling stone
    0x1F3AF: "bull's_eye.n.02",    # direct hit (the target centre)
    0x1F41B: "caterpillar.n.01",   # bug (drawn as a caterpillar)
    0x1F98B: "butterfly.n.01",     # butterfly
    0x1F987: "bat.n.01",           # bat (animal)
    0x1F986: "duck.n.01",          # duck
    0x1F414: "chicken.n.02",       # chicken (the bird)
    0x1F413: "rooster.n.01",       # rooster
    0x1F95A: "egg.n.02",           # egg (food)
    0x1F33D: "corn.n.03",          # ear of maize
    0x1F336: "chili.n.02",         # hot pepper
    0x1F95C: "peanut.n.04",        # peanuts
    0x1F330: "chestnut.n.03",      # chestnut (the nut)
    0x1F34A: "tangerine.n.02",     # tangerine (fruit)
    0x1F34B: "lemon.n.01",         # lemon
    0x1F351: "peach.n.03",         # peach (fruit)
    0x1F352: "cherry.n.03",        # cherries (fruit)
    0x1F353: "strawberry.n.01",    # strawberry
    0x1F347: "grape.n.01",         # grapes
    0x1F954: "potato.n.01",        # potato
    0x1F35E: "bread.n.01",         # bread
    0x1F36A: "cookie.n.01",        # cookie
    0x1F35A: "rice.n.01",          # cooked rice
    0x1F6A2: "ship.n.01",          # ship
    0x1F680: "rocket.n.01",        # rocket
    0x1F6F8: "flying_saucer.n.01", # flying saucer
    0x1F681: "helicopter.n.01",    # helicopter
    0x1F6B2: "bicycle.n.01",       # bicycle
    0x1F697: "car.n.01",           # automobile
    0x1F695: "cab.n.03",           # taxi
    0x1F68C: "bus.n.01",           # bus
    0x1F69A: "truck.n.01",         # delivery truck
    0x1F682: "locomotive.n.01",    # locomotive
    0x1F683: "car.n.02",           # railway car
    0x1F6E9: "airplane.n.01",      # small airplane
    0x2708: "airplane.n.01",       # airplane
    0x1F6F5: "motor_scooter.n.01", # motor scooter
    0x1F6F4: "scooter.n.02",       # kick scooter
    0x1F3CD: "motorcycle.n.01",    # motorcycle
    0x1F6A4: "speedboat.n.01",     # speedboat
    0x26F5: "sailboat.n.01",       # sailboat
    0x1F6F6: "canoe.n.01",         # canoe
    0x1F6A0: "cable_car.n.01",     # mountain cableway
    0x1F6A1: "cable_car.n.01",     # aerial tramway
    0x1F68F: "bus_stop.n.01",      # bus stop
    0x1F6A6: "traffic_light.n.01", # vertical traffic light
    0x1F6A5: "traffic_light.n.01", # horizontal traffic light
    0x2693: "anchor.n.01",         # anchor
    0x1F528: "hammer.n.02",        # hammer (tool)
    0x1F527: "wrench.n.03",        # wrench
    0x1F529: "nut_and_bolt.n.01",  # nut and bolt
    0x2702: "scissors.n.01",       # scissors
    0x1F511: "key.n.01",           # key
    0x1F512: "lock.n.01",          # locked
    0x1F52A: "knife.n.02",         # kitchen knife
    0x1F5E1: "dagger.n.01",        # dagger
    0x1F3F9: "bow.n.04",           # bow and arrow
    0x1F6E1: "shield.n.02",        # shield
    0x1F52B: "pistol.n.01",        # pistol
    0x1F4CE: "paper_clip.n.01",    # paperclip
    0x1F4CC: "thumbtack.n.01",     # pushpin
    0x1F58A: "ballpoint.n.01",     # pen
    0x270F: "pencil.n.01",         # pencil
    0x1F4CF: "rule.n.12",          # straight ruler
    0x1F50D: "magnifier.n.01",     # magnifying glass
    0x1F50E: "magnifier.n.01",
    0x1F4BB: "laptop.n.01",        # laptop
    0x1F5A5: "desktop_computer.n.01",
    0x2328: "keyboard.n.01",       # keyboard
    0x1F5B1: "mouse.n.04",         # computer mouse
    0x1F4F1: "cellular_telephone.n.01",
    0x260E: "telephone.n.01",      # telephone
    0x1F4FA: "television_receiver.n.01",
    0x1F4F7: "camera.n.01",        # camera
    0x1F4FB: "radio_receiver.n.01",
    0x1F3A4: "microphone.n.01",    # microphone
    0x1F3A7: "earphone.n.01",      # headphone
    0x1F3B8: "guitar.n.01",        # guitar
    0x1F3BA: "trumpet.n.01",       # trumpet
    0x1F3BB: "violin.n.01",        # violin
    0x1F3B9: "piano.n.01",         # musical keyboard
    0x1F941: "drum.n.01",          # drum
    0x1F3B7: "sax.n.02",           # saxophone
    0x1F514: "bell.n.01",          # bell
    0x231B: "hourglass.n.01",      # hourglass done
    0x23F3: "hourglass.n.01",
    0x231A: "watch.n.01",          # watch
    0x23F0: "alarm_clock.n.01",    # alarm clock
    0x1F570: "clock.n.01",         # mantelpiece clock
    0x23F1: "stopwatch.n.01",      # stopwatch
    0x1F321: "thermometer.n.01",   # thermometer
    0x2602: "umbrella.n.01",       # umbrella
    0x2614: "umbrella.n.01",
    0x2603: "snowman.n.01",        # snowman
    0x26C4: "snowman.n.01",
    0x2600: "sun.n.01",            # sun
    0x1F31E: "sun.n.01",           # sun with face
    0x2601: "cloud.n.02",          # cloud
    0x26A1: "lightning.n.02",      # high voltage (lightning bolt)
    0x1F32A: "tornado.n.01",       # tornado
    0x1F32B: "fog.n.02",           # fog
    0x1F308: "rainbow.n.01",       # rainbow
    0x2744: "snowflake.n.01",      # snowflake
    0x1F525: "fire.n.03",          # fire (the flame)
    0x1F4A7: "drop.n.01",          # droplet (the shape)
    0x1F30A: "wave.n.01",          # water wave
    0x2B50: "star.n.03",           # star
    0x1F31F: "star.n.03",
    0x2604: "comet.n.01",          # comet
    0x1F30B: "volcano.n.02",       # volcano
    0x1F3D4: "mountain.n.01",      # snow-capped mountain
    0x26F0: "mountain.n.01",
    0x1F3DD: "island.n.01",        # desert island
    0x1F3DC: "desert.n.01",        # desert
    0x1F3D6: "beach.n.01",         # beach with umbrella
    0x1F333: "tree.n.01",          # deciduous tree
    0x1F332: "evergreen.n.01",     # evergreen tree
    0x1F334: "palm.n.03",          # palm tree
    0x1F335: "cactus.n.01",        # cactus
    0x1F337: "tulip.n.01",         # tulip
    0x1F339: "rose.n.01",          # rose
    0x1F33B: "sunflower.n.01",     # sunflower
    0x1F33C: "flower.n.01",        # blossom
    0x1F338: "flower.n.02",        # cherry blossom
    0x1F33A: "hibiscus.n.01",      # hibiscus
    0x1F340: "clover.n.01",        # four leaf clover
    0x2618: "shamrock.n.01",       # shamrock
    0x1F341: "leaf.n.01",          # maple leaf
    0x1F342: "leaf.n.01",          # fallen leaf
    0x1F343: "leaf.n.01",          # leaf fluttering in wind
    0x1F344: "mushroom.n.05",      # mushroom
    0x1F331: "seedling.n.01",      # seedling
    0x1F33E: "rice.n.02",          # sheaf of rice
    0x1F490: "bouquet.n.01",       # bouquet
    0x1F940: "flower.n.01",        # wilted flower
    0x1F3E0: "house.n.01",         # house
    0x1F3E5: "hospital.n.01",      # hospital
    0x1F3EB: "school.n.02",        # school (building)
    0x1F3F0: "castle.n.02",        # castle
    0x26EA: "church.n.02",         # church (building)
    0x26FA: "tent.n.01",           # tent
    0x26F2: "fountain.n.01",       # fountain
    0x1F5FD: "statue_of_liberty.n.01",
    0x1F5FC: "tower.n.01",         # Tokyo tower
    0x1F451: "crown.n.04",         # crown
    0x1F453: "spectacles.n.01",    # glasses
    0x1F576: "sunglasses.n.01",    # sunglasses
    0x1F454: "necktie.n.01",       # necktie
    0x1F455: "shirt.n.01",         # t-shirt
    0x1F456: "jean.n.01",          # jeans
    0x1F457: "dress.n.01",         # dress
    0x1F45F: "sneaker.n.01",       # running shoe
    0x1F45E: "shoe.n.01",          # man's shoe
    0x1F460: "shoe.n.01",          # high-heeled shoe
    0x1F462: "boot.n.01",          # woman's boot
    0x1F452: "hat.n.01",           # woman's hat
    0x1F3A9: "top_hat.n.01",       # top hat
    0x1F393: "mortarboard.n.02",   # graduation cap
    0x1F45C: "handbag.n.01",       # handbag
    0x1F45B: "purse.n.01",         # purse
    0x1F392: "bag.n.06",           # backpack
    0x1F48E: "gem.n.02",           # gem stone
    0x1F4B0: "moneybag.n.01",      # money bag
    0x1F381: "present.n.02",       # wrapped gift
    0x1F388: "balloon.n.01",       # balloon
    0x1F380: "ribbon.n.04",        # ribbon
    0x1F384: "christmas_tree.n.05",
    0x1F383: "jack-o'-lantern.n.02",
    0x1F56F: "candle.n.01",        # candle
    0x1F6AA: "door.n.01",          # door
    0x1F6CF: "bed.n.01",           # bed
    0x1F6CB: "couch.n.01",         # couch and lamp
    0x1F6BD: "toilet.n.02",        # toilet
    0x1F6BF: "shower.n.01",        # shower
    0x1F6C1: "bathtub.n.01",       # bathtub
    0x1F48A: "pill.n.02",          # pill
    0x1F489: "syringe.n.01",       # syringe
    0x1F4D6: "book.n.02",          # open book
    0x1F4DA: "book.n.02",          # books
    0x1F4F0: "newspaper.n.03",     # newspaper
    0x2709: "envelope.n.01",       # envelope
    0x1F4E6: "box.n.01",           # package
    0x1F5D1: "wastebasket.n.01",   # wastebasket
    0x1F4BE: "floppy_disk.n.01",   # floppy disk
    0x1F4BF: "compact_disk.n.01",  # optical disk
    0x1F4C5: "calendar.n.02",      # calendar
    0x1F5FA: "map.n.01",           # world map
    0x1F9ED: "compass.n.01",       # compass
    0x1F30D: "earth.n.01",         # globe showing Europe-Africa
    0x1F30E: "earth.n.01",
    0x1F30F: "earth.n.01",
    0x1F310: "globe.n.03",         # globe with meridians
    0x1F319: "crescent.n.01",      # crescent moon
    0x1F996: "tyrannosaur.n.01",   # t-rex
    0x1F432: "dragon.n.01",        # dragon face (WordNet files dragons under noun.person)
    0x1F409: "dragon.n.01",        # dragon
    0x1F923: "face.n.01",          # rolling on the floor laughing (a smiley)
    0x1F495: "heart.n.07",         # two hearts (the shape, not the organ)
    0x1F49E: "heart.n.07",         # revolving hearts
    0x1F303: "night.n.01",         # night with stars (not Nox the goddess)
    0x1F309: "bridge.n.01",        # bridge at night
    0x1F647: "bow.n.06",           # person bowing (the gesture, not the weapon)
    0x1F918: "gesture.n.02",       # sign of the horns
    0x1F64F: "hand.n.01",          # folded hands
    0x270C: "gesture.n.02",        # victory hand (not the letter v)
    0x1F19A: "",                   # vs button
    0x274C: "",                    # cross mark
    0x1F945: "goal.n.03",          # goal net
    0x1F364: "prawn.n.01",         # fried shrimp
    0x1F990: "shrimp.n.03",        # shrimp
    0x1F3CB: "weightlifter.n.01",  # person lifting weights
    0x1F507: "loudspeaker.n.01",   # muted speaker
    0x1F508: "loudspeaker.n.01",   # speaker low volume
    0x1F509: "loudspeaker.n.01",   # speaker medium volume
    0x1F50A: "loudspeaker.n.01",   # speaker high volume
    0x1F688: "streetcar.n.01",     # light rail
    0x1F44D: "thumb.n.01",         # thumbs up
    0x1F44E: "thumb.n.01",         # thumbs down
    0x261D: "index.n.05",          # index pointing up
    0x1F446: "index.n.05",         # backhand index pointing up/down/left/right
    0x1F447: "index.n.05",
    0x1F448: "index.n.05",
    0x1F449: "index.n.05",
    0x1F942: "glass.n.02",         # clinking glasses
    0x1F464: "bust.n.03",          # bust in silhouette
    0x1F465: "bust.n.03",
    0x1F4D1: "bookmark.n.01",      # bookmark tabs
    0x1F516: "bookmark.n.01",      # bookmark
    0x1F5C2: "card_index.n.01",    # card index dividers
    0x1F4C7: "card_index.n.01",    # card index
    0x1F645: "gesture.n.02",       # person gesturing no
    0x1F646: "gesture.n.02",       # person gesturing ok
    0x1F6B8: "pedestrian_crossing.n.01",  # children crossing
    0x1F936: "",                   # mrs. claus: no fitting sense
    0x1F39A: "",                   # level slider
    0x23F8: "",                    # pause button
    0x2716: "",                    # multiply (the sign)
}

# Head-word senses chosen by hand (the frequency-first sense is the wrong reading for emoji).
HEAD_SENSES = {
    "arrow": "arrow.n.01",         # the directional mark, not the projectile
    "ring": "ring.n.08",
    "face": "face.n.01",
    "moon": "moon.n.01",
    "heart": "heart.n.07",         # the shape
    "clock": "clock.n.01",
    "hand": "hand.n.01",
    "cat": "cat.n.01",
    "mouse": "mouse.n.01",
    "bat": "bat.n.01",
    "crab": "crab.n.01",
    "monkey": "monkey.n.01",
    "pig": "pig.n.01",
    "horse": "horse.n.01",
    "cow": "cow.n.01",
    "tiger": "tiger.n.02",
    "bear": "bear.n.01",
    "fox": "fox.n.01",
    "wolf": "wolf.n.01",
    "dragon": "dragon.n.01",
    "rabbit": "rabbit.n.01",
    "hamster": "hamster.n.01",
    "frog": "frog.n.01",
    "bird": "bird.n.01",
    "fish": "fish.n.01",
    "flag": "flag.n.01",
    "house": "house.n.01",
    "train": "train.n.01",
    "car": "car.n.01",
    "bus": "bus.n.01",
    "ball": "ball.n.01",
    "star": "star.n.03",
    "cloud": "cloud.n.02",
    "bell": "bell.n.01",
    "club": "club.n.03",
    "spade": "spade.n.02",
    "diamond": "diamond.n.03",
    "pen": "pen.n.01",
    "key": "key.n.01",
    "bow": "bow.n.04",
    "button": "",                  # never a head noun
}

_ANIMAL_FACE = re.compile(r"^(.+) face$")


def _phrase_synsets(wn: Any, phrase: str) -> list[Any]:
    phrase = phrase.strip().replace("’", "'")
    if not phrase or not re.search(r"[a-z]", phrase):
        return []
    return wn.synsets(phrase.replace(" ", "_"), pos="n")


def _lemma_count(syn: Any, phrase: str) -> int:
    key = phrase.replace(" ", "_").lower()
    return sum(lem.count() for lem in syn.lemmas() if lem.name().lower() == key)


def _singular(wn: Any, word: str) -> str:
    """"eyes" → "eye" even though WordNet also lists "eyes" (morphy stops at the latter)."""
    forms = getattr(wn, "_morphy", lambda w, p: [wn.morphy(w, p) or w])(word, "n")
    other = [f for f in forms if f != word]
    return (other[0] if other else word).lower()


def best_noun_synset(wn: Any, phrase: str) -> Any | None:
    """The best noun sense of `phrase`: a drawable sense if any, then highest lemma count,
    then WordNet's own order (most frequent first)."""
    if " " not in phrase:
        base = _singular(wn, phrase)                  # "hearts" → "heart"
        if base in HEAD_SENSES:
            name = HEAD_SENSES[base]
            return wn.synset(name) if name else None
    syns = _phrase_synsets(wn, phrase)
    if not syns:
        return None
    key = phrase.replace(" ", "_").lower()
    base = _singular(wn, key)
    # senses whose head lemma is the phrase itself first ("shrimp" the animal over "runt",
    # where shrimp is a side lemma); then drawable ones; then frequency; then WordNet's order
    ranked = sorted(enumerate(syns), key=lambda t: (
        t[1].lemmas()[0].name().lower() not in (key, base),
        t[1].lexname() not in _DEPICTABLE,
        -_lemma_count(t[1], phrase), t[0]))
    return ranked[0][1]


def map_to_synset(codepoint: int, label: str, name: str, aliases: tuple[str, ...]
                  ) -> tuple[str | None, str]:
    """Map one emoji to a WordNet noun synset name; returns (synset or None, how) with how in
    {"curated", "direct", "rule", "none"}.

    Order: the curated table (it also overrides wrong senses a name lookup would pick), then
    a direct lookup of the whole CLDR name, Unicode name or alias, then head-noun rules."""
    wn = get_wordnet()
    if codepoint in CURATED:
        return CURATED[codepoint] or None, "curated"
    # 1. direct: the CLDR name, the Unicode name, the aliases, as whole phrases
    for phrase in (label, name, *aliases):
        syn = best_noun_synset(wn, phrase) if phrase else None
        if syn is not None:
            return syn.name(), "direct"
    # 2. head-noun rules: structural ones on both names first, then dropping modifiers
    for rule in (_structural_rule, _tail_rule):
        for phrase in (label, name):
            syn = rule(wn, phrase.lower().replace("’", "'"))
            if syn is not None:
                return syn.name(), "rule"
    return None, "none"


def _structural_rule(wn: Any, phrase: str) -> Any | None:
    """"dog face" → dog (an animal's face is drawn as the animal); "face with tongue" and
    "grinning face" → face; "sun with face" → sun; "clock face ten-thirty" → clock; any
    arrow → arrow (the mark)."""
    words = [w for w in re.split(r"[\s-]+", phrase) if w]
    if phrase.startswith("clock face"):
        return wn.synset("clock.n.01")
    if "arrow" in words or "arrows" in words:
        return wn.synset(HEAD_SENSES["arrow"])
    if words and words[0] == "face":
        return wn.synset(HEAD_SENSES["face"])
    m = _ANIMAL_FACE.match(phrase)
    if m:   # "grinning cat face" → cat
        syn = best_noun_synset(wn, m.group(1)) or _tail_rule(wn, m.group(1))
        if syn is not None and syn.lexname() == "noun.animal":
            return syn
    for sep in (" with ", " and ", " but ", " of ", " in ", " on ", " for ", ": "):
        if sep in phrase:
            head = phrase.split(sep)[0]
            syn = best_noun_synset(wn, head) or _structural_rule(wn, head) \
                or _tail_rule(wn, head)
            if syn is not None:
                return syn
    if words and words[-1] == "face":
        return wn.synset(HEAD_SENSES["face"])
    return None


# Tails that read as nouns in WordNet but are directions, numbers or words of a label here.
_BAD_TAILS = {"up", "down", "left", "right", "no", "ok", "x", "on", "off", "top", "end", "back",
              "soon", "new", "free", "open", "in", "out", "mode", "volume", "thirty", "bar"}


# A modifier-stripped tail in these files is a misreading ("dusk" time, "mode" attribute).
_ABSTRACT = {"noun.Tops", "noun.time", "noun.relation", "noun.motive", "noun.feeling",
             "noun.attribute", "noun.state", "noun.process", "noun.cognition"}


def _tail_rule(wn: Any, phrase: str) -> Any | None:
    """"red apple" → apple: drop modifiers from the left until a concrete noun remains."""
    words = [w for w in re.split(r"[\s-]+", phrase) if w]
    for i in range(1, len(words)):
        tail = " ".join(words[i:])
        if tail in _FRAME_WORDS or tail in _BAD_TAILS:
            break
        syn = best_noun_synset(wn, tail)
        if syn is not None and syn.lexname() not in _ABSTRACT:
            return syn
    return None
