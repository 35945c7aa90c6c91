"""The downstream task suite of the offline world: classification tasks from easy to
fine-grained, each an ordered list of (emoji code point, class name).

Class names are what a user would type (they are what zero-shot prompts are built from), so
they are readable English, unique within a task, and sometimes differ from the Unicode name
("oncoming fist" stays, "hocho" becomes "kitchen knife"). Every class exists in both fonts
(checked by `get_tasks`). Order is the label order and never changes within a WORLD_VERSION.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .config import WorldConfig

DIFFICULTY = {1: "easy", 2: "medium", 3: "hard", 4: "fine-grained"}


@dataclass(frozen=True)
class TaskSpec:
    name: str                                  # identifier used in `world:<name>`
    description: str
    difficulty: int                            # 1 easy … 4 fine-grained
    classes: tuple[tuple[int, str], ...]       # (code point, class name), label order

    @property
    def classnames(self) -> list[str]:
        return [n for _, n in self.classes]

    @property
    def concept_ids(self) -> list[str]:
        return [f"u{cp:04x}" for cp, _ in self.classes]

    @property
    def difficulty_name(self) -> str:
        return DIFFICULTY[self.difficulty]


def _t(name: str, difficulty: int, description: str, classes: str) -> TaskSpec:
    """Parse "1f415 dog; 1f408 cat; ..." — compact and easy to review."""
    pairs = []
    for item in classes.split(";"):
        item = item.strip()
        if item:
            cp, cname = item.split(" ", 1)
            pairs.append((int(cp, 16), cname.strip()))
    return TaskSpec(name, description, difficulty, tuple(pairs))


TASKS: tuple[TaskSpec, ...] = (
    _t("objects", 1, "Coarse everyday things from many categories (like Caltech101).",
       "1f415 dog; 1f408 cat; 1f40e horse; 1f418 elephant; 1f426 bird; 1f41f fish; "
       "1f697 car; 2708 airplane; 1f6b2 bicycle; 1f6a2 ship; 1f680 rocket; 1f34e apple; "
       "1f34c banana; 1f355 pizza; 1f3e0 house; 1f333 tree; 1f337 tulip; 1f3b8 guitar; "
       "2602 umbrella; 23f0 alarm clock; 1f511 key; 1f4d5 book; 260e telephone; "
       "1f4f7 camera; 1f528 hammer; 2702 scissors; 1f4a1 light bulb; 1f451 crown; "
       "2600 sun; 2603 snowman; 1f514 bell; 1f388 balloon"),
    _t("animals", 2, "Whole animals: mammals, birds, reptiles, fish and insects.",
       "1f400 rat; 1f401 mouse; 1f402 ox; 1f404 cow; 1f405 tiger; 1f406 leopard; "
       "1f407 rabbit; 1f408 cat; 1f40a crocodile; 1f40b whale; 1f40c snail; 1f40d snake; "
       "1f40e horse; 1f40f ram; 1f410 goat; 1f412 monkey; 1f413 rooster; 1f415 dog; "
       "1f416 pig; 1f418 elephant; 1f419 octopus; 1f41c ant; 1f41d honeybee; "
       "1f41e ladybug; 1f422 turtle; 1f427 penguin; 1f428 koala; 1f42a camel; "
       "1f42c dolphin; 1f980 crab; 1f982 scorpion; 1f983 turkey; 1f985 eagle; 1f986 duck; "
       "1f987 bat; 1f988 shark; 1f989 owl; 1f98b butterfly; 1f98c deer; 1f98d gorilla; "
       "1f98e lizard; 1f98f rhinoceros; 1f990 shrimp; 1f991 squid; 1f994 hedgehog"),
    _t("animal_faces", 2, "Animal heads drawn face-on (like Oxford Pets, many species).",
       "1f42d mouse; 1f42e cow; 1f42f tiger; 1f430 rabbit; 1f431 cat; 1f432 dragon; "
       "1f434 horse; 1f435 monkey; 1f436 dog; 1f437 pig; 1f438 frog; 1f439 hamster; "
       "1f43a wolf; 1f43b bear; 1f43c panda; 1f981 lion; 1f984 unicorn; 1f98a fox; "
       "1f992 giraffe; 1f993 zebra"),
    _t("fruit_veg", 2, "Fruits, vegetables and nuts.",
       "1f347 grapes; 1f348 melon; 1f349 watermelon; 1f34a tangerine; 1f34b lemon; "
       "1f34c banana; 1f34d pineapple; 1f34e red apple; 1f34f green apple; 1f350 pear; "
       "1f351 peach; 1f352 cherries; 1f353 strawberry; 1f345 tomato; 1f346 eggplant; "
       "1f33d ear of corn; 1f336 hot pepper; 1f344 mushroom; 1f330 chestnut; "
       "1f951 avocado; 1f952 cucumber; 1f954 potato; 1f955 carrot; 1f95d kiwi fruit; "
       "1f965 coconut; 1f966 broccoli; 1f95c peanuts; 1f360 roasted sweet potato"),
    _t("meals", 3, "Prepared food, snacks and sweets (like Food-101).",
       "1f32d hot dog; 1f32e taco; 1f32f burrito; 1f354 hamburger; 1f355 pizza; "
       "1f356 meat on bone; 1f357 poultry leg; 1f358 rice cracker; 1f359 rice ball; "
       "1f35b curry rice; 1f35c steaming bowl of noodles; 1f35d spaghetti; 1f35e bread; "
       "1f35f french fries; 1f361 dango; 1f363 sushi; 1f364 fried shrimp; "
       "1f366 soft ice cream; 1f367 shaved ice; 1f368 ice cream; 1f369 doughnut; "
       "1f36a cookie; 1f36b chocolate bar; 1f36c candy; 1f36d lollipop; 1f36e custard; "
       "1f370 shortcake; 1f382 birthday cake; 1f37f popcorn; 1f950 croissant; "
       "1f956 baguette; 1f957 green salad; 1f95a egg; 1f95e pancakes; 1f95f dumpling; "
       "1f967 pie; 1f968 pretzel; 1f96a sandwich; 1f9c0 cheese wedge; 1f953 bacon"),
    _t("vehicles", 2, "Land, water and air vehicles (like Stanford Cars, coarser).",
       "1f682 steam locomotive; 1f683 railway car; 1f684 high-speed train; "
       "1f687 metro; 1f68a tram; 1f68c bus; 1f68e trolleybus; 1f690 minibus; "
       "1f691 ambulance; 1f692 fire engine; 1f693 police car; 1f695 taxi; "
       "1f697 automobile; 1f699 sport utility vehicle; 1f69a delivery truck; "
       "1f69b articulated lorry; 1f69c tractor; 1f69d monorail; 1f6b2 bicycle; "
       "1f3cd motorcycle; 1f3ce racing car; 1f6f5 motor scooter; 1f6f4 kick scooter; "
       "1f6a2 ship; 26f5 sailboat; 1f6a4 speedboat; 26f4 ferry; 1f6f6 canoe; "
       "2708 airplane; 1f681 helicopter; 1f680 rocket; 1f6f8 flying saucer; "
       "1f6a1 aerial tramway; 1f6f0 satellite"),
    _t("plants", 2, "Plants, flowers, leaves and landscapes (like Oxford Flowers, coarser).",
       "1f331 seedling; 1f332 evergreen tree; 1f333 deciduous tree; 1f334 palm tree; "
       "1f335 cactus; 1f337 tulip; 1f338 cherry blossom; 1f339 rose; 1f33a hibiscus; "
       "1f33b sunflower; 1f33c blossom; 1f33e sheaf of rice; 1f33f herb; "
       "1f340 four leaf clover; 1f341 maple leaf; 1f342 fallen leaf; "
       "1f343 leaf fluttering in wind; 1f490 bouquet; 1f940 wilted flower; 2618 shamrock; "
       "1f30b volcano; 26f0 mountain; 1f3d4 snow-capped mountain; 1f3dd desert island; "
       "1f3dc desert; 1f30a water wave"),
    _t("sports", 2, "Sports balls and equipment.",
       "26bd soccer ball; 26be baseball; 1f3c0 basketball; 1f3c8 american football; "
       "1f3c9 rugby ball; 1f3be tennis; 1f3d0 volleyball; 1f3b3 bowling; "
       "1f3cf cricket; 1f3d1 field hockey; 1f3d2 ice hockey; 1f3d3 ping pong; "
       "1f3f8 badminton; 1f94a boxing glove; 1f945 goal net; 26f3 flag in hole; "
       "26f8 ice skate; 1f3bf skis; 1f3a3 fishing pole; 1f3b1 pool 8 ball; "
       "1f3af bullseye; 1f94c curling stone; 1f94b martial arts uniform; 1f6f7 sled; "
       "1f3c6 trophy; 1f3c5 sports medal; 1f3bd running shirt"),
    _t("activities", 3, "People doing things (like UCF101 stills).",
       "1f3c3 person running; 1f3c4 person surfing; 1f3ca person swimming; "
       "1f3cb person lifting weights; 1f3cc person golfing; 1f3c7 horse racing; "
       "1f3c2 snowboarder; 26f7 skier; 26f9 person bouncing ball; "
       "1f6a3 person rowing boat; 1f6b4 person biking; 1f6b5 person mountain biking; "
       "1f6b6 person walking; 1f6c0 person taking bath; 1f6cc person in bed; "
       "1f938 person cartwheeling; 1f939 person juggling; 1f93a person fencing; "
       "1f93c people wrestling; 1f93d person playing water polo; "
       "1f93e person playing handball; 1f9d7 person climbing; "
       "1f9d8 person in lotus position; 1f57a man dancing; 1f926 person facepalming; "
       "1f937 person shrugging; 1f647 person bowing; 1f64b person raising hand"),
    _t("tools", 2, "Tools, instruments and small objects.",
       "1f528 hammer; 1f527 wrench; 1f529 nut and bolt; 2702 scissors; 1f511 key; "
       "1f512 padlock; 1f52a kitchen knife; 1f5e1 dagger; 1f3f9 bow and arrow; "
       "1f6e1 shield; 26cf pick; 2699 gear; 26d3 chains; 2693 anchor; 2696 balance scale; "
       "2697 alembic; 1f52c microscope; 1f52d telescope; 1f526 flashlight; "
       "1f50c electric plug; 1f50b battery; 1f4a1 light bulb; 1f50d magnifying glass; "
       "1f4ce paperclip; 1f4cc pushpin; 1f4cf straight ruler; 1f4d0 triangular ruler; "
       "270f pencil; 1f58a pen; 1f58c paintbrush; 1f58d crayon; 1f5dc clamp; "
       "1f489 syringe; 1f48a pill; 1f56f candle; 1f5d1 wastebasket"),
    _t("devices", 2, "Electronics, media and musical instruments.",
       "231a watch; 2328 keyboard; 260e telephone; 1f4f1 mobile phone; 1f4bb laptop; "
       "1f5a5 desktop computer; 1f5a8 printer; 1f5b1 computer mouse; 1f579 joystick; "
       "1f3ae video game controller; 1f4fa television; 1f4fb radio; 1f4f7 camera; "
       "1f3a5 movie camera; 1f4f9 video camera; 1f4fd film projector; 1f4fc videocassette; "
       "1f4be floppy disk; 1f4bf optical disk; 1f4df pager; 1f4e0 fax machine; "
       "1f4e1 satellite antenna; 1f4e2 loudspeaker; 1f4e3 megaphone; 1f3a4 microphone; "
       "1f3a7 headphones; 1f3b7 saxophone; 1f3b8 guitar; 1f3b9 musical keyboard; "
       "1f3ba trumpet; 1f3bb violin; 1f941 drum"),
    _t("buildings", 3, "Buildings and landmarks (like SUN397, coarser).",
       "1f3e0 house; 1f3e1 house with garden; 1f3e2 office building; 1f3e4 post office; "
       "1f3e5 hospital; 1f3e6 bank; 1f3e8 hotel; 1f3ea convenience store; 1f3eb school; "
       "1f3ec department store; 1f3ed factory; 1f3ef japanese castle; 1f3f0 castle; "
       "26ea church; 1f54c mosque; 1f54d synagogue; 1f54b kaaba; 26e9 shinto shrine; "
       "26fa tent; 26f2 fountain; 1f3df stadium; 1f3db classical building; "
       "1f3da derelict house; 1f5fc tokyo tower; 1f5fd statue of liberty; "
       "1f3a1 ferris wheel; 1f3a2 roller coaster; 1f3aa circus tent"),
    _t("clothing", 2, "Clothes, shoes and accessories (like Fashion-MNIST, richer).",
       "1f451 crown; 1f452 woman's hat; 1f453 glasses; 1f454 necktie; 1f455 t-shirt; "
       "1f456 jeans; 1f457 dress; 1f458 kimono; 1f459 bikini; 1f45b purse; "
       "1f45c handbag; 1f45d clutch bag; 1f45e man's shoe; 1f45f running shoe; "
       "1f460 high-heeled shoe; 1f461 sandal; 1f462 boot; 1f3a9 top hat; "
       "1f393 graduation cap; 1f9e2 billed cap; 1f9e3 scarf; 1f9e4 gloves; 1f9e5 coat; "
       "1f9e6 socks; 1f576 sunglasses; 1f392 backpack; 1f48d ring; 1f484 lipstick; "
       "1f48e gem stone; 26d1 rescue worker's helmet"),
    _t("weather", 3, "Weather and sky.",
       "2600 sun; 2601 cloud; 2614 umbrella with rain drops; 2744 snowflake; "
       "26c5 sun behind cloud; 26c8 cloud with lightning and rain; "
       "1f324 sun behind small cloud; 1f326 sun behind rain cloud; 1f327 cloud with rain; "
       "1f328 cloud with snow; 1f329 cloud with lightning; 1f32a tornado; 1f32b fog; "
       "1f32c wind face; 1f308 rainbow; 1f300 cyclone; 26a1 lightning bolt; 2604 comet; "
       "26c4 snowman; 1f321 thermometer; 1f4a7 droplet; 1f525 fire; 2b50 star; "
       "1f320 shooting star"),
    _t("zodiac", 3, "The signs of the zodiac (abstract symbols).",
       "2648 aries; 2649 taurus; 264a gemini; 264b cancer; 264c leo; 264d virgo; "
       "264e libra; 264f scorpio; 2650 sagittarius; 2651 capricorn; 2652 aquarius; "
       "2653 pisces; 26ce ophiuchus"),
    _t("hearts", 4, "Hearts that differ by colour or decoration (colour cues vanish in "
       "sketches).",
       "2764 red heart; 1f499 blue heart; 1f49a green heart; 1f49b yellow heart; "
       "1f49c purple heart; 1f5a4 black heart; 1f9e1 orange heart; 1f494 broken heart; "
       "1f495 two hearts; 1f496 sparkling heart; 1f497 growing heart; "
       "1f498 heart with arrow; 1f49d heart with ribbon; 1f49e revolving hearts; "
       "1f49f heart decoration; 1f493 beating heart; 2763 heart exclamation; "
       "2665 heart suit"),
    _t("clocks", 4, "Clock faces showing the 24 whole and half hours.",
       "1f550 one o'clock; 1f551 two o'clock; 1f552 three o'clock; 1f553 four o'clock; "
       "1f554 five o'clock; 1f555 six o'clock; 1f556 seven o'clock; "
       "1f557 eight o'clock; 1f558 nine o'clock; 1f559 ten o'clock; "
       "1f55a eleven o'clock; 1f55b twelve o'clock; 1f55c half past one; "
       "1f55d half past two; 1f55e half past three; 1f55f half past four; "
       "1f560 half past five; 1f561 half past six; 1f562 half past seven; "
       "1f563 half past eight; 1f564 half past nine; 1f565 half past ten; "
       "1f566 half past eleven; 1f567 half past twelve"),
    _t("moon_phases", 4, "Phases of the moon, plain and with a face.",
       "1f311 new moon; 1f312 waxing crescent moon; 1f313 first quarter moon; "
       "1f314 waxing gibbous moon; 1f315 full moon; 1f316 waning gibbous moon; "
       "1f317 last quarter moon; 1f318 waning crescent moon; 1f31a new moon face; "
       "1f31b first quarter moon face; 1f31c last quarter moon face; "
       "1f31d full moon face"),
    _t("hand_gestures", 4, "Hand gestures and signs.",
       "261d index pointing up; 270a raised fist; 270b raised hand; 270c victory hand; "
       "270d writing hand; 1f446 backhand index pointing up; "
       "1f447 backhand index pointing down; 1f448 backhand index pointing left; "
       "1f449 backhand index pointing right; 1f44a oncoming fist; 1f44b waving hand; "
       "1f44c ok hand; 1f44d thumbs up; 1f44e thumbs down; 1f44f clapping hands; "
       "1f450 open hands; 1f590 hand with fingers splayed; 1f596 vulcan salute; "
       "1f918 sign of the horns; 1f919 call me hand; 1f91a raised back of hand; "
       "1f91b left-facing fist; 1f91c right-facing fist; 1f91d handshake; "
       "1f91e crossed fingers; 1f91f love-you gesture; 1f932 palms up together; "
       "1f64c raising hands; 1f64f folded hands; 1f4aa flexed biceps"),
    _t("faces", 4, "Facial expressions (smileys).",
       "1f600 grinning face; 1f601 beaming face with smiling eyes; "
       "1f602 face with tears of joy; 1f603 grinning face with big eyes; "
       "1f605 grinning face with sweat; 1f606 grinning squinting face; "
       "1f607 smiling face with halo; 1f608 smiling face with horns; 1f609 winking face; "
       "1f60a smiling face with smiling eyes; 1f60b face savoring food; "
       "1f60c relieved face; 1f60d smiling face with heart-eyes; "
       "1f60e smiling face with sunglasses; 1f60f smirking face; 1f610 neutral face; "
       "1f611 expressionless face; 1f612 unamused face; 1f614 pensive face; "
       "1f615 confused face; 1f617 kissing face; 1f618 face blowing a kiss; "
       "1f61b face with tongue; 1f61c winking face with tongue; 1f61e disappointed face; "
       "1f620 angry face; 1f621 enraged face; 1f622 crying face; "
       "1f624 face with steam from nose; 1f628 fearful face; 1f629 weary face; "
       "1f62a sleepy face; 1f62c grimacing face; 1f62d loudly crying face; "
       "1f62e face with open mouth; 1f632 astonished face; 1f633 flushed face; "
       "1f634 sleeping face; 1f637 face with medical mask; 1f643 upside-down face"),
    _t("arrows", 4, "Arrows that differ only in direction or shape.",
       "2194 left-right arrow; 2195 up-down arrow; 2196 up-left arrow; "
       "2197 up-right arrow; 2198 down-right arrow; 2199 down-left arrow; "
       "21a9 right arrow curving left; 21aa left arrow curving right; 27a1 right arrow; "
       "2934 right arrow curving up; 2935 right arrow curving down; 2b05 left arrow; "
       "2b06 up arrow; 2b07 down arrow; 1f503 clockwise vertical arrows; "
       "1f504 counterclockwise arrows; 1f519 back arrow; 1f51a end arrow; "
       "1f51b on arrow; 1f51c soon arrow; 1f51d top arrow"),
)


#: The ImageNet-like source task of the cross-dataset and domain-generalisation protocols:
#: 318 classes across every category, 188 of them shared with the tasks above (as ImageNet
#: shares classes with Pets or Caltech) and 130 other WordNet-mapped concepts. Chosen once by
#: a fixed rule (every third task concept and every fourth other mapped concept, in code point
#: order; a name already taken falls back to the Unicode name) and frozen here.
SOURCE_TASK = "source"
SOURCE = _t(SOURCE_TASK, 2, "ImageNet-like source task: 318 classes from every category.",
       "203c double exclamation mark; 2194 left-right arrow; 2197 up-right arrow; "
       "21a9 right arrow curving left; 231b hourglass done; 2328 keyboard; "
       "23ec fast down button; 23f1 stopwatch; 23fa record button; 25b6 play button; "
       "25fd white medium-small square; 2601 cloud; 2604 comet; 2618 shamrock; "
       "2620 skull and crossbones; 2638 wheel of dharma; 2649 taurus; 264c leo; 264f scorpio; "
       "2652 aquarius; 2660 spade suit; 267e infinity; 2693 anchor; 2695 medical symbol; "
       "2699 gear; 26aa white circle; 26be baseball; 26c8 cloud with lightning and rain; "
       "26d1 rescue worker's helmet; 26d4 no entry; 26ea church; 26f3 flag in hole; "
       "26f7 skier; 26fa tent; 2709 envelope; 270a raised fist; 270d writing hand; "
       "2721 star of david; 2747 sparkle; 2757 red exclamation mark; 2763 heart exclamation; "
       "27b0 curly loop; 2934 right arrow curving up; 2b06 up arrow; 2b55 hollow red circle; "
       "1f0cf joker; 1f17f p button; 1f193 free button; 1f198 sos button; 1f300 cyclone; "
       "1f303 night with stars; 1f309 bridge at night; 1f30b volcano; "
       "1f30f globe showing asia-australia; 1f313 first quarter moon; "
       "1f316 waning gibbous moon; 1f31a new moon face; 1f31d full moon face; "
       "1f31f glowing star; 1f324 sun behind small cloud; 1f328 cloud with snow; 1f32b fog; "
       "1f32e taco; 1f331 seedling; 1f334 palm tree; 1f337 tulip; 1f33a hibiscus; "
       "1f33d ear of corn; 1f340 four leaf clover; 1f343 leaf fluttering in wind; "
       "1f346 eggplant; 1f349 watermelon; 1f34c banana; 1f34f green apple; 1f352 cherries; "
       "1f355 pizza; 1f358 rice cracker; 1f35c steaming bowl of noodles; 1f35f french fries; "
       "1f363 sushi; 1f367 shaved ice; 1f36a cookie; 1f36d lollipop; 1f36f honey pot; "
       "1f374 fork and knife; 1f378 cocktail glass; 1f37c baby bottle; 1f37f popcorn; "
       "1f381 wrapped gift; 1f386 fireworks; 1f38b tanabata tree; 1f38f carp streamer; "
       "1f392 backpack; 1f397 reminder ribbon; 1f39f admission tickets; 1f3a2 roller coaster; "
       "1f3a5 movie camera; 1f3aa circus tent; 1f3ab ticket; 1f3b1 pool 8 ball; "
       "1f3b2 game die; 1f3b8 guitar; 1f3bb violin; 1f3bc musical score; 1f3bf skis; "
       "1f3c3 person running; 1f3c6 trophy; 1f3c9 rugby ball; 1f3cc person golfing; "
       "1f3cf cricket; 1f3d2 ice hockey; 1f3d7 building construction; 1f3da derelict house; "
       "1f3dd desert island; 1f3e1 house with garden; 1f3e3 japanese post office; "
       "1f3e5 hospital; 1f3ea convenience store; 1f3ed factory; 1f3f3 white flag; "
       "1f3f8 badminton; 1f3fa amphora; 1f401 mouse; 1f405 tiger; 1f408 cat; 1f40c snail; "
       "1f40f ram; 1f413 rooster; 1f414 chicken; 1f418 elephant; 1f41d honeybee; "
       "1f420 tropical fish; 1f422 turtle; 1f425 front-facing baby chick; 1f428 koala; "
       "1f42d mouse face; 1f430 rabbit; 1f434 horse; 1f437 pig; 1f43a wolf; 1f43d pig nose; "
       "1f441 eye; 1f445 tongue; 1f446 backhand index pointing up; "
       "1f449 backhand index pointing right; 1f44c ok hand; 1f44f clapping hands; "
       "1f452 woman's hat; 1f455 t-shirt; 1f458 kimono; 1f45c handbag; 1f45f running shoe; "
       "1f462 boot; 1f465 busts in silhouette; 1f469 woman; 1f46d women holding hands; "
       "1f471 person blond hair; 1f475 old woman; 1f479 ogre; 1f47d alien; "
       "1f481 person tipping hand; 1f486 person getting massage; 1f48a pill; "
       "1f48c love letter; 1f490 bouquet; 1f495 two hearts; 1f498 heart with arrow; "
       "1f49b yellow heart; 1f49e revolving hearts; 1f4a0 diamond with a dot; "
       "1f4a6 sweat droplets; 1f4a7 droplet; 1f4ad thought balloon; 1f4b1 currency exchange; "
       "1f4b5 dollar banknote; 1f4b9 chart increasing with yen; 1f4be floppy disk; 1f4c0 dvd; "
       "1f4c5 calendar; 1f4c9 chart decreasing; 1f4ce paperclip; 1f4d1 bookmark tabs; "
       "1f4d5 book; 1f4d6 open book; 1f4da books; 1f4de telephone receiver; "
       "1f4e1 satellite antenna; 1f4e7 e-mail; 1f4eb closed mailbox with raised flag; "
       "1f4ef postal horn; 1f4f1 mobile phone; 1f4f6 antenna bars; 1f4fa television; "
       "1f4fd film projector; 1f501 repeat button; 1f509 speaker medium volume; 1f50b battery; "
       "1f510 locked with key; 1f511 key; 1f517 link; 1f519 back arrow; 1f51c soon arrow; "
       "1f521 input latin lowercase; 1f526 flashlight; 1f529 nut and bolt; 1f52b water pistol; "
       "1f52d telescope; 1f531 trident emblem; 1f537 large blue diamond; "
       "1f53b red triangle pointed down; 1f54d synagogue; 1f54e menorah; 1f552 three o'clock; "
       "1f555 six o'clock; 1f558 nine o'clock; 1f55b twelve o'clock; 1f55e half past three; "
       "1f561 half past six; 1f564 half past nine; 1f567 half past twelve; 1f575 detective; "
       "1f579 joystick; 1f58b fountain pen; 1f58c paintbrush; 1f596 vulcan salute; "
       "1f5a8 printer; 1f5c2 card index dividers; 1f5d3 spiral calendar; 1f5dc clamp; "
       "1f5e8 left speech bubble; 1f5fb mount fuji; 1f5fd statue of liberty; "
       "1f602 face with tears of joy; 1f606 grinning squinting face; 1f609 winking face; "
       "1f60c relieved face; 1f60f smirking face; 1f612 unamused face; 1f616 confounded face; "
       "1f617 kissing face; 1f61c winking face with tongue; 1f61f worried face; "
       "1f621 enraged face; 1f627 anguished face; 1f628 fearful face; 1f62c grimacing face; "
       "1f631 face screaming in fear; 1f632 astonished face; 1f637 face with medical mask; "
       "1f639 cat with tears of joy; 1f63d kissing cat; 1f641 slightly frowning face; "
       "1f646 person gesturing ok; 1f64b person raising hand; 1f64e person pouting; "
       "1f680 rocket; 1f683 railway car; 1f689 station; 1f68a tram; 1f690 minibus; "
       "1f693 police car; 1f694 oncoming police car; 1f699 sport utility vehicle; "
       "1f69c tractor; 1f69f suspension railway; 1f6a2 ship; 1f6a7 construction; "
       "1f6ac cigarette; 1f6b1 non-potable water; 1f6b2 bicycle; 1f6b6 person walking; "
       "1f6b9 men's room; 1f6be water closet; 1f6c3 customs; 1f6cd shopping bags; "
       "1f6d2 shopping cart; 1f6e1 shield; 1f6e4 railway track; 1f6ec airplane arrival; "
       "1f6f5 motor scooter; 1f6f8 flying saucer; 1f912 face with thermometer; 1f916 robot; "
       "1f91a raised back of hand; 1f91d handshake; 1f922 nauseated face; "
       "1f926 person facepalming; 1f927 sneezing face; 1f92b shushing face; "
       "1f92f exploding head; 1f935 person in tuxedo; 1f938 person cartwheeling; "
       "1f93c people wrestling; 1f940 wilted flower; 1f94a boxing glove; 1f950 croissant; "
       "1f953 bacon; 1f956 baguette; 1f959 stuffed flatbread; 1f95c peanuts; 1f95f dumpling; "
       "1f962 chopsticks; 1f967 pie; 1f96b canned food; 1f980 crab; 1f983 turkey; 1f986 duck; "
       "1f989 owl; 1f98c deer; 1f98f rhinoceros; 1f992 giraffe; 1f9c0 cheese wedge; "
       "1f9d0 face with monocle; 1f9d4 person beard; 1f9db vampire; 1f9e0 brain; "
       "1f9e1 orange heart; 1f9e4 gloves")
#: mini world: the source task keeps this many classes (others keep max_classes_per_task)
_MINI_SOURCE_CLASSES = 30


def _evenly(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n) (deterministic subsampling for the mini world)."""
    if k >= n:
        return list(range(n))
    return [round(i * (n - 1) / (k - 1)) for i in range(k)] if k > 1 else [0]


def get_tasks(cfg: WorldConfig | None = None) -> dict[str, TaskSpec]:
    """The task suite of a configuration, the source task last (mini: each task capped to a
    few classes)."""
    from .config import get_config

    cfg = cfg or get_config()
    cap = getattr(cfg, "max_classes_per_task", None)
    out: dict[str, TaskSpec] = {}
    for t in (*TASKS, SOURCE):
        classes = t.classes
        k = cap if t.name != SOURCE_TASK or cap is None else max(cap, _MINI_SOURCE_CLASSES)
        if k is not None and len(classes) > k:
            classes = tuple(classes[i] for i in _evenly(len(classes), k))
        out[t.name] = TaskSpec(t.name, t.description, t.difficulty, classes)
    return out


def downstream_tasks(names) -> list[str]:
    """The task names other than the source task (the 21 tasks tables average over)."""
    return [n for n in names if n != SOURCE_TASK]


def task_concept_ids(cfg: WorldConfig | None = None) -> list[str]:
    """Every concept id the configuration's tasks use, sorted, without repeats."""
    return sorted({cid for t in get_tasks(cfg).values() for cid in t.concept_ids})


def validate_tasks(concept_ids: set[str], tasks: Iterable[TaskSpec] = TASKS) -> None:
    """Raise if a task is malformed: a class missing from a font, duplicate names or concepts."""
    for t in tasks:
        names = t.classnames
        if len(set(names)) != len(names):
            raise ValueError(f"task {t.name}: duplicate class names")
        if len(set(t.concept_ids)) != len(names):
            raise ValueError(f"task {t.name}: a concept used twice")
        missing = [c for c in t.concept_ids if c not in concept_ids]
        if missing:
            raise ValueError(f"task {t.name}: concepts not in both fonts: {missing}")
