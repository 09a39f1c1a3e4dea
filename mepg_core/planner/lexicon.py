"""Word knowledge for the offline planner: nouns with typical sizes, plurals, counts, colours, styles.

Everything here is plain data plus two small functions (:func:`singular`, :func:`noun_shape`). The noun
table is a lexicon, not a limit: the parser also accepts nouns it has never seen (it takes the head of the
noun phrase); the table only lets it find multi-word names ("wine glass", "hair drier") and give each
object a believable size and aspect ratio.
"""

from __future__ import annotations

import os
from functools import lru_cache

_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

# --------------------------------------------------------------------------------------------------
# Nouns: name -> (typical largest dimension in metres, aspect width/height as usually seen).
# Sizes are rough on purpose; the layout compresses them (a cup must stay visible next to a bus).

_SHAPES_TEXT = """
person 1.7 0.45; bicycle 1.7 1.6; car 4.5 2.0; motorcycle 2.0 1.5; airplane 30 2.2; bus 11 2.4;
train 40 2.8; truck 7 2.1; boat 6 1.8; traffic light 1.0 0.4; fire hydrant 0.8 0.6; stop sign 0.8 0.9;
parking meter 1.3 0.35; bench 1.6 2.0; bird 0.3 1.1; cat 0.5 1.3; dog 0.8 1.3; horse 2.2 1.3;
sheep 1.3 1.3; cow 2.2 1.5; elephant 4.5 1.3; bear 2.0 1.4; zebra 2.3 1.3; giraffe 5.0 0.7;
backpack 0.5 0.75; umbrella 1.0 1.2; handbag 0.35 1.1; tie 0.5 0.35; suitcase 0.7 0.75; frisbee 0.25 1.6;
skis 1.7 0.4; snowboard 1.5 0.4; sports ball 0.22 1.0; kite 1.0 1.0; baseball bat 0.9 0.25;
baseball glove 0.3 1.0; skateboard 0.8 2.5; surfboard 2.0 0.35; tennis racket 0.7 0.55; bottle 0.3 0.35;
wine glass 0.22 0.5; cup 0.1 0.9; fork 0.2 0.3; knife 0.25 0.25; spoon 0.18 0.3; bowl 0.2 1.8;
banana 0.2 1.6; apple 0.09 1.0; sandwich 0.15 1.3; orange 0.09 1.0; broccoli 0.2 0.9; carrot 0.2 1.6;
hot dog 0.2 2.0; pizza 0.35 1.5; donut 0.1 1.3; cake 0.25 1.2; chair 1.0 0.7; couch 2.0 2.0;
potted plant 0.7 0.7; bed 2.0 1.6; dining table 1.8 1.7; toilet 0.75 0.7; tv 1.1 1.6; laptop 0.35 1.3;
computer mouse 0.11 1.3; tv remote 0.2 0.35; computer keyboard 0.45 3.0; cell phone 0.15 0.55;
microwave 0.5 1.6; oven 0.8 1.0; toaster 0.3 1.3; sink 0.6 1.6; refrigerator 1.8 0.5; book 0.25 0.75;
clock 0.35 1.0; vase 0.35 0.6; scissors 0.2 0.6; teddy bear 0.4 0.8; hair drier 0.25 1.0;
toothbrush 0.19 0.25;
man 1.75 0.4; woman 1.7 0.4; boy 1.3 0.45; girl 1.3 0.45; child 1.1 0.45; kid 1.1 0.45; baby 0.6 0.9;
toddler 0.9 0.5; lady 1.7 0.4; gentleman 1.75 0.4; king 1.8 0.45; queen 1.75 0.45; prince 1.8 0.4;
princess 1.7 0.45; knight 1.8 0.5; soldier 1.8 0.45; wizard 1.8 0.5; witch 1.7 0.5; astronaut 1.8 0.55;
robot 1.7 0.5; chef 1.75 0.45; doctor 1.75 0.4; nurse 1.7 0.4; student 1.7 0.4; teacher 1.7 0.4;
dancer 1.7 0.5; musician 1.7 0.5; farmer 1.75 0.45; firefighter 1.8 0.45; pirate 1.8 0.5; ninja 1.75 0.5;
samurai 1.75 0.5; cowboy 1.8 0.45; clown 1.7 0.5; angel 1.8 0.8; fairy 0.3 0.8; ghost 1.7 0.6;
zombie 1.75 0.45; vampire 1.8 0.45; superhero 1.8 0.5; warrior 1.8 0.5; monk 1.7 0.45; mermaid 1.8 0.6;
elf 1.5 0.45; dwarf 1.3 0.55; snowman 1.7 0.65; scarecrow 1.8 0.6; skeleton 1.7 0.45; player 1.8 0.45;
puppy 0.4 1.3; kitten 0.3 1.2; mouse 0.1 1.5; rat 0.25 1.6; rabbit 0.4 1.0; bunny 0.35 1.0;
hamster 0.12 1.3; squirrel 0.4 1.0; fox 0.8 1.4; wolf 1.4 1.4; deer 1.8 1.1; moose 2.5 1.1; lion 2.2 1.5;
tiger 2.5 1.6; leopard 2.0 1.6; cheetah 2.0 1.6; panda 1.5 1.1; monkey 0.7 0.8; gorilla 1.6 1.0;
kangaroo 1.6 0.7; koala 0.7 0.9; camel 3.0 1.2; donkey 1.8 1.3; goat 1.2 1.3; pig 1.4 1.5; duck 0.5 1.1;
goose 0.8 0.9; chicken 0.5 0.9; hen 0.5 0.9; rooster 0.6 0.8; owl 0.5 0.7; eagle 0.9 1.3; hawk 0.8 1.2;
parrot 0.5 0.6; penguin 0.8 0.5; flamingo 1.3 0.6; swan 1.2 1.0; pigeon 0.3 1.1; dove 0.3 1.1;
sparrow 0.15 1.1; fish 0.4 1.8; goldfish 0.15 1.5; shark 4.0 2.5; whale 15 3.0; dolphin 2.5 2.5;
turtle 0.6 1.5; tortoise 0.6 1.5; frog 0.15 1.2; snake 1.5 2.0; lizard 0.4 2.0; crocodile 4.0 3.0;
alligator 4.0 3.0; dinosaur 8.0 1.5; dragon 8.0 1.3; unicorn 2.2 1.2; butterfly 0.1 1.3; bee 0.05 1.2;
ladybug 0.04 1.2; spider 0.1 1.3; crab 0.3 1.4; octopus 1.0 1.0; jellyfish 0.5 0.8; snail 0.08 1.4;
ox 2.5 1.5; bull 2.5 1.5; calf 1.5 1.3; lamb 1.0 1.3; pony 1.5 1.2; llama 1.8 0.8; alpaca 1.6 0.8;
hippo 4.0 1.7; rhino 4.0 1.6; seal 1.8 2.2; otter 1.0 1.5; raccoon 0.7 1.3; hedgehog 0.25 1.4;
animal 1.0 1.3; creature 1.5 1.0; pet 0.6 1.3;
tree 8.0 0.7; bush 1.2 1.4; flower 0.4 0.6; rose 0.4 0.5; sunflower 1.8 0.4; tulip 0.4 0.4; daisy 0.3 0.6;
lily 0.4 0.6; cactus 1.5 0.5; plant 0.7 0.7; mushroom 0.1 1.0; leaf 0.1 0.8; rock 0.6 1.3; stone 0.3 1.3;
boulder 2.0 1.3; mountain 3000 2.0; hill 200 2.5; volcano 2000 1.8; waterfall 30 0.8; moon 1.0 1.0;
sun 1.0 1.0; star 0.3 1.0; cloud 3.0 2.0; rainbow 10 2.0; planet 1.5 1.0; pumpkin 0.4 1.3;
house 10 1.3; castle 30 1.2; tower 30 0.35; lighthouse 20 0.35; barn 12 1.3; church 20 0.9;
skyscraper 150 0.3; building 20 0.8; bridge 50 3.5; windmill 15 0.6; tent 3.0 1.5; cabin 8.0 1.4;
hut 4.0 1.2; pyramid 100 1.6; temple 20 1.3; fence 2.0 3.0; gate 3.0 1.2; door 2.0 0.5; window 1.2 0.8;
statue 3.0 0.5; fountain 3.0 1.0; mailbox 1.2 0.5; bin 1.0 0.7; lamppost 4.0 0.2; streetlight 5.0 0.25;
bike 1.7 1.6; scooter 1.2 1.2; tractor 4.0 1.4; van 5.0 1.9; taxi 4.5 2.0; ambulance 6.0 2.0;
helicopter 12 2.2; rocket 30 0.3; spaceship 20 1.5; ship 100 2.5; sailboat 8.0 0.9; canoe 4.0 3.5;
submarine 30 3.0; tank 7.0 2.0; cart 2.0 1.5; wagon 3.0 1.6; carriage 3.0 1.3; sled 1.5 1.8;
balloon 0.35 0.8; hot air balloon 15 0.8; drone 0.4 1.6; jeep 4.5 1.6;
table 1.5 1.6; desk 1.4 1.6; sofa 2.0 2.0; armchair 1.0 1.0; stool 0.6 0.7; shelf 1.5 1.5;
bookshelf 2.0 0.8; bookcase 2.0 0.8; cabinet 1.5 0.8; wardrobe 2.0 0.6; dresser 1.2 1.2;
nightstand 0.6 0.9; lamp 0.6 0.5; candle 0.2 0.35; mirror 1.0 0.7; rug 2.0 1.8; carpet 2.0 1.8;
pillow 0.5 1.4; cushion 0.45 1.3; box 0.5 1.2; basket 0.4 1.3; bag 0.4 1.0; jar 0.2 0.7; pot 0.3 1.2;
pan 0.4 1.8; plate 0.27 2.0; mug 0.12 1.0; glass 0.15 0.6; teapot 0.25 1.3; kettle 0.25 1.1;
bucket 0.35 0.9; barrel 1.0 0.7; piano 1.5 1.3; guitar 1.0 0.4; violin 0.6 0.35; drum 0.6 1.2;
trumpet 0.5 1.8; computer 0.5 1.1; monitor 0.6 1.5; screen 0.8 1.6; phone 0.15 0.55; camera 0.15 1.4;
television 1.1 1.6; radio 0.3 1.5; headphones 0.2 1.0; watch 0.05 0.8; key 0.08 0.5; hammer 0.3 0.5;
globe 0.4 0.8; painting 0.8 1.3; poster 0.7 0.7; sign 1.0 1.2; flag 1.5 1.5; ladder 3.0 0.35;
broom 1.4 0.2; bell 0.3 0.9; crown 0.2 1.3; hat 0.3 1.4; cap 0.25 1.3; shoe 0.3 1.6; boot 0.4 0.9;
glasses 0.15 2.2; sunglasses 0.15 2.2; egg 0.06 0.8; bread 0.25 1.8; cheese 0.15 1.4; pear 0.12 0.7;
cherry 0.03 0.9; grape 0.03 0.9; strawberry 0.04 0.85; lemon 0.08 1.3; lime 0.06 1.2; peach 0.08 1.0;
watermelon 0.35 1.3; pineapple 0.3 0.55; tomato 0.08 1.1; potato 0.1 1.3; cookie 0.08 1.0;
cupcake 0.08 0.9; pie 0.25 1.6; burger 0.12 1.2; hamburger 0.12 1.2; ice cream 0.2 0.6; doughnut 0.1 1.3;
teacup 0.1 1.2; ball 0.25 1.0; toy 0.3 1.0; doll 0.4 0.5; cone 0.6 0.7; cube 0.5 1.0; sphere 0.5 1.0;
block 0.3 1.0; coin 0.03 1.0; heart 0.3 1.0; trophy 0.4 0.6; gift 0.3 1.1; present 0.3 1.1;
sword 1.0 0.2; shield 0.8 0.8; lantern 0.3 0.6; torch 0.5 0.3; campfire 1.0 1.3; wheel 0.7 1.0;
television set 1.1 1.6; sofa bed 2.0 2.0; coffee table 1.2 2.2; picture frame 0.5 1.2;
christmas tree 2.5 0.6; palm tree 10 0.6; traffic cone 0.7 0.7; fire truck 9.0 2.3; police car 4.8 2.0;
school bus 11 2.4; soccer ball 0.22 1.0; football 0.22 1.0; basketball 0.24 1.0; tennis ball 0.07 1.0;
beach ball 0.4 1.0; water bottle 0.25 0.35; coffee mug 0.12 1.0; smartphone 0.15 0.55;
mobile phone 0.15 0.55; remote control 0.2 0.35; hair dryer 0.25 1.0; sports car 4.5 2.3;
guinea pig 0.25 1.5; polar bear 2.4 1.4; sea lion 2.2 2.0; teddy 0.4 0.8; fridge 1.8 0.5;
motorbike 2.0 1.5; aeroplane 30 2.2; plane 30 2.2; jet 30 2.2; keyboard 0.45 3.0; cellphone 0.15 0.55;
nest 0.3 1.5; cage 0.6 0.8; aquarium 1.0 1.5; bowl 0.2 1.8; cutting board 0.4 1.6; board 0.6 1.5;
pen 0.15 0.25; pencil 0.18 0.2; brush 0.2 0.3; folder 0.3 1.3; briefcase 0.45 1.3; wallet 0.1 1.4;
notebook 0.25 0.8; envelope 0.22 1.5; ruler 0.3 4.0; tape measure 0.1 1.2; vespa 1.8 1.4;
candlestick 0.3 0.4; tray 0.45 1.8; napkin 0.3 1.3; saucer 0.15 2.5;
platter 0.45 1.8; chopsticks 0.24 0.3; spatula 0.3 0.4; wok 0.35 1.8; blender 0.4 0.6; rover 3.0 1.5;
typewriter 0.45 1.6; easel 1.7 0.7; log 2.0 3.0; stump 0.6 1.3; pillar 4.0 0.25;
column 4.0 0.25; post 1.2 0.2; fence post 1.2 0.2;
rocking chair 1.0 0.8; fireplace 1.4 1.2; bathtub 1.6 2.2; tub 1.5 2.0;
"""


def _parse_shapes(text: str) -> dict[str, tuple[float, float]]:
    table: dict[str, tuple[float, float]] = {}
    for entry in text.replace("\n", " ").split(";"):
        parts = entry.split()
        if len(parts) < 3:
            continue
        name = " ".join(parts[:-2])
        table[name] = (float(parts[-2]), float(parts[-1]))
    return table


NOUN_SHAPES: dict[str, tuple[float, float]] = _parse_shapes(_SHAPES_TEXT)
DEFAULT_SHAPE = (1.0, 1.0)


@lru_cache(maxsize=1)
def geneval_object_names() -> tuple[str, ...]:
    """GenEval's 80 object classes (the COCO classes), read from the shipped data file."""
    path = os.path.join(_DATA_DIR, "object_names.txt")
    try:
        with open(path, encoding="utf-8") as fh:
            return tuple(line.strip().lower() for line in fh if line.strip())
    except OSError:
        return ()


def _known_nouns() -> frozenset[str]:
    names = set(NOUN_SHAPES)
    names.update(geneval_object_names())
    names.update(PLURALIA_TANTUM)
    return frozenset(names)


# Nouns that name one object although they look plural ("a pair of scissors" is one object).
PLURALIA_TANTUM = frozenset({
    "scissors", "skis", "glasses", "sunglasses", "eyeglasses", "goggles", "binoculars", "pants",
    "trousers", "jeans", "shorts", "pajamas", "pyjamas", "tongs", "pliers", "tweezers", "headphones",
    "earphones", "earbuds", "clothes", "overalls", "leggings",
})

# Same form in singular and plural.
INVARIANT_NOUNS = frozenset({
    "sheep", "fish", "deer", "moose", "bison", "salmon", "trout", "shrimp", "squid", "aircraft",
    "spacecraft", "species", "series", "offspring", "swine", "broccoli", "elk", "buffalo", "cod",
    "tuna", "hovercraft", "sushi",
})

IRREGULAR_PLURALS = {
    "people": "person", "persons": "person", "men": "man", "women": "woman", "children": "child",
    "kids": "kid", "mice": "mouse", "geese": "goose", "teeth": "tooth", "feet": "foot", "oxen": "ox",
    "lice": "louse", "knives": "knife", "wives": "wife", "lives": "life", "leaves": "leaf",
    "loaves": "loaf", "wolves": "wolf", "calves": "calf", "halves": "half", "elves": "elf",
    "shelves": "shelf", "scarves": "scarf", "thieves": "thief", "hooves": "hoof", "cacti": "cactus",
    "fungi": "fungus", "dwarves": "dwarf", "cattle": "cow", "dice": "die", "phenomena": "phenomenon",
    "firemen": "fireman", "policemen": "policeman", "snowmen": "snowman", "gentlemen": "gentleman",
    "fishermen": "fisherman", "businessmen": "businessman", "businesswomen": "businesswoman",
    "octopi": "octopus", "bacteria": "bacterium", "potatoes": "potato", "tomatoes": "tomato",
    "mangoes": "mango", "heroes": "hero", "volcanoes": "volcano", "echoes": "echo", "torpedoes": "torpedo",
    "buses": "bus", "busses": "bus", "walruses": "walrus", "platypuses": "platypus", "octopuses": "octopus",
    "cactuses": "cactus", "irises": "iris", "lenses": "lens", "canvases": "canvas",
}

# Words ending in -s that are singular nouns (so no "-s" is stripped).
SINGULAR_S_WORDS = frozenset({
    "bus", "glass", "grass", "dress", "class", "boss", "cactus", "octopus", "walrus", "platypus",
    "hippopotamus", "iris", "lens", "canvas", "atlas", "christmas", "news", "tennis", "chess", "gas",
    "bass", "moss", "compass", "mattress", "fortress", "princess", "goddess", "actress", "waitress",
    "harness", "cross", "circus", "hummus", "asparagus", "lotus", "virus", "citrus", "bonus", "campus",
    "chorus", "census", "status", "apparatus", "rhinoceros", "albatross", "pegasus", "kiss",
    "mess", "lass", "brass", "mass", "oasis", "axis", "tiramisu", "hibiscus",
    "crocus", "abacus", "papyrus", "lapis", "bliss", "cypress", "witness", "wilderness", "darkness",
})


@lru_cache(maxsize=4096)
def singular(word: str) -> tuple[str, bool | None]:
    """Singular form of a lower-case noun and whether the input was plural (None: can't tell).

    Candidates are checked against the noun lexicon first, so "buses" gives "bus", "toothbrushs" (a
    misspelling in GenEval) gives "toothbrush" and "sheeps" gives "sheep"; unknown words fall back to
    English spelling rules.
    """
    w = word.lower()
    if not w:
        return w, False
    if " " in w:
        head, _, last = w.rpartition(" ")
        # A known compound decides first: "wine glasses" is two wine glasses, not spectacles.
        for cand in (last[:-2], last[:-1]) if last.endswith("s") else ():
            if f"{head} {cand}" in known_nouns():
                return f"{head} {cand}", True
        sing, plural = singular(last)
        return f"{head} {sing}", plural
    if w in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[w], True
    # "glasses" is a pair of spectacles or several drinking glasses; the parser decides from the count.
    if w in INVARIANT_NOUNS or (w in PLURALIA_TANTUM and w != "glasses"):
        return w, None
    nouns = known_nouns()
    if w in nouns or w in SINGULAR_S_WORDS:
        return w, False
    candidates: list[str] = []
    if w.endswith("ies") and len(w) > 4:
        candidates += [w[:-3] + "y", w[:-1]]
    if w.endswith("ves") and len(w) > 4:
        candidates += [w[:-3] + "f", w[:-3] + "fe", w[:-1]]
    if w.endswith("es") and len(w) > 3:
        candidates += [w[:-2], w[:-1]]
    if w.endswith("s") and len(w) > 2:
        candidates.append(w[:-1])
    for cand in candidates:
        if cand in nouns or cand in INVARIANT_NOUNS:
            return cand, True
    # Unknown word: spelling rules only.
    if w.endswith(("ss", "us", "is", "ous", "'s")) or len(w) <= 3 or not w.endswith("s"):
        return w, False
    if w.endswith("ies") and len(w) > 4:
        return w[:-3] + "y", True
    if w.endswith(("ches", "shes", "sses", "xes", "zes")):
        return w[:-2], True
    return w[:-1], True


@lru_cache(maxsize=1)
def known_nouns() -> frozenset[str]:
    return _known_nouns()


@lru_cache(maxsize=1)
def compound_nouns() -> dict[str, tuple[str, ...]]:
    """First word -> multi-word nouns starting with it, longest first ("wine" -> ("wine glass",))."""
    index: dict[str, list[str]] = {}
    for name in known_nouns():
        if " " in name:
            index.setdefault(name.split()[0], []).append(name)
    return {k: tuple(sorted(v, key=lambda s: (-len(s.split()), s))) for k, v in index.items()}


# Sizes of things the table lacks, by their WordNet class (the median of the table's entries of that class).
KIND_SHAPES = {"person": (1.7, 0.45), "animal": (0.6, 1.3), "food": (0.12, 1.1), "plant": (0.6, 0.7),
               "thing": (0.5, 1.0)}


def noun_shape(label: str, kind: str | None = None) -> tuple[float, float]:
    """(typical size in metres, aspect width/height) for a label; the head word decides unknown compounds,
    the noun's class (``kind``) anything else."""
    shape = NOUN_SHAPES.get(label)
    if shape is None:
        shape = NOUN_SHAPES.get(label.split()[-1]) if label else None
    return shape or KIND_SHAPES.get(kind or "", DEFAULT_SHAPE)


# --------------------------------------------------------------------------------------------------
# Counts

NUMBER_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15,
    "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20, "thirty": 30,
    "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90, "hundred": 100,
    "thousand": 1000, "single": 1, "lone": 1, "solitary": 1, "both": 2, "twin": 2, "twins": 2,
    "dozen": 12, "dozens": 24, "hundreds": 100, "thousands": 1000,
}
# Vague quantities: how many regions a plan draws for them.
VAGUE_FEW = 3
VAGUE_MANY = 5
VAGUE_WORDS = {
    "some": VAGUE_FEW, "few": VAGUE_FEW, "several": VAGUE_FEW, "multiple": VAGUE_FEW, "various": VAGUE_FEW,
    "many": VAGUE_MANY, "numerous": VAGUE_MANY, "countless": VAGUE_MANY, "lots": VAGUE_MANY,
}
# "a herd of cows": the collective noun gives no number; "a pair of" / "a trio of" do.
COLLECTIVE_NOUNS = {
    "pair": 2, "couple": 2, "trio": 3, "quartet": 4, "dozen": 12, "group": VAGUE_MANY, "herd": VAGUE_MANY,
    "flock": VAGUE_MANY, "pack": VAGUE_MANY, "crowd": VAGUE_MANY, "swarm": VAGUE_MANY, "school": VAGUE_MANY,
    "bunch": VAGUE_MANY, "pile": VAGUE_MANY, "stack": VAGUE_MANY, "row": VAGUE_MANY, "line": VAGUE_MANY,
    "lot": VAGUE_MANY, "lots": VAGUE_MANY, "number": VAGUE_MANY, "handful": VAGUE_FEW, "collection": VAGUE_MANY,
    "family": VAGUE_FEW, "team": VAGUE_MANY, "set": VAGUE_FEW, "cluster": VAGUE_FEW, "plenty": VAGUE_MANY,
    "bouquet": VAGUE_MANY, "gang": VAGUE_MANY, "troop": VAGUE_MANY, "litter": VAGUE_FEW, "fleet": VAGUE_MANY,
    "series": VAGUE_FEW, "variety": VAGUE_FEW, "assortment": VAGUE_FEW, "selection": VAGUE_FEW,
}

# --------------------------------------------------------------------------------------------------
# Colours. GenEval's ten first; the rest are common names. A modifier word turns "blue" into
# "light blue" and stays part of the colour phrase.

GENEVAL_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
COLOR_WORDS = frozenset(GENEVAL_COLORS + (
    "gray", "grey", "silver", "gold", "golden", "beige", "tan", "cyan", "magenta", "teal", "turquoise",
    "navy", "maroon", "violet", "lavender", "indigo", "crimson", "scarlet", "ivory", "cream", "khaki",
    "olive", "lime", "mint", "coral", "salmon", "peach", "amber", "bronze", "copper", "charcoal", "emerald",
    "ruby", "aqua", "burgundy", "mauve", "lilac", "rust", "ochre", "ocher", "azure", "cobalt", "sapphire",
    "jade", "fuchsia", "plum", "chocolate", "caramel", "blond", "blonde", "auburn", "ginger", "platinum",
    "reddish", "bluish", "greenish", "yellowish", "pinkish", "purplish", "brownish", "greyish", "grayish",
    "whitish", "blackish", "orangish", "multicolored", "multicoloured", "colorful", "colourful", "rainbow",
))
COLOR_MODIFIERS = frozenset({
    "light", "dark", "pale", "bright", "deep", "pastel", "neon", "hot", "baby", "sky", "navy", "royal",
    "forest", "lime", "olive", "blood", "jet", "snow", "off", "dusty", "vivid", "muted", "electric",
    "metallic", "matte", "glossy", "midnight", "powder", "sea", "mint", "rose", "lemon", "bottle",
})

# --------------------------------------------------------------------------------------------------
# Styles: phrase -> canonical style tag (the layout's ``style`` field).

STYLE_PHRASES = {
    "photo": "photo", "photograph": "photo", "photographic": "photo", "photorealistic": "photo",
    "photo-realistic": "photo", "realistic": "photo", "hyperrealistic": "photo", "hyper-realistic": "photo",
    "lifelike": "photo", "photoreal": "photo", "realism": "photo", "real-life": "photo", "dslr": "photo",
    "anime": "anime", "manga": "anime", "anime-style": "anime", "chibi": "anime",
    "cartoon": "cartoon", "cartoonish": "cartoon", "cartoony": "cartoon", "cartoon-style": "cartoon",
    "toon": "cartoon",
    "watercolor": "watercolor", "watercolour": "watercolor", "water color": "watercolor",
    "water colour": "watercolor", "watercolor-style": "watercolor",
    "oil painting": "oil painting", "oil-painted": "oil painting", "oil paint": "oil painting",
    "oil on canvas": "oil painting",
    "pixel art": "pixel art", "pixel-art": "pixel art", "pixelated": "pixel art", "8-bit": "pixel art",
    "16-bit": "pixel art", "pixel": "pixel art",
    "sketch": "sketch", "sketched": "sketch", "pencil sketch": "sketch", "pencil drawing": "sketch",
    "pencil": "sketch", "charcoal drawing": "sketch", "charcoal sketch": "sketch", "sketchy": "sketch",
    "line art": "line art", "line drawing": "line art", "lineart": "line art",
    "3d render": "3d render", "3d": "3d render", "3d-rendered": "3d render", "cgi": "3d render",
    "3d rendered": "3d render", "rendered": "3d render",
    "low poly": "low poly", "low-poly": "low poly",
    "claymation": "clay", "plasticine": "clay",
    "comic": "comic", "comic-book": "comic", "comic book": "comic",
    "digital art": "digital art", "digital painting": "digital art",
    "impressionist": "impressionist", "impressionistic": "impressionist",
    "ukiyo-e": "ukiyo-e", "woodblock": "ukiyo-e",
    "stained glass": "stained glass", "stained-glass": "stained glass",
    "origami": "origami", "vector": "vector", "flat vector": "vector",
}
STYLE_FIRST_WORDS = frozenset(p.split()[0] for p in STYLE_PHRASES)

# "a watercolor painting of", "a photo of": the medium noun of a framing phrase.
MEDIUM_NOUNS = {
    "photo": "photo", "photograph": "photo", "snapshot": "photo", "shot": "photo", "selfie": "photo",
    "picture": None, "image": None, "pic": None, "painting": "painting", "drawing": "sketch",
    "sketch": "sketch", "illustration": "illustration", "render": "3d render", "rendering": "3d render",
    "artwork": None, "art": None, "depiction": None, "portrait": None, "still": None, "print": None,
    "cartoon": "cartoon", "comic": "comic", "close-up": "photo", "closeup": "photo", "view": None,
    "scene": None, "animation": "cartoon", "doodle": "sketch",
}

# --------------------------------------------------------------------------------------------------
# Other word classes the parser needs

DETERMINERS = frozenset({
    "a", "an", "the", "this", "that", "these", "those", "my", "your", "his", "her", "its", "our", "their",
    "another", "each", "every", "any", "some", "one's",
})
# Words that end a noun phrase and never start one.
CONJUNCTIONS = frozenset({"and", "or", "but", "plus", "while", "whereas", "then", "nor", "&", "also", "as"})
PREPOSITIONS = frozenset({
    "on", "in", "at", "of", "to", "from", "by", "near", "next", "beside", "besides", "behind", "under",
    "above", "below", "over", "between", "beneath", "underneath", "atop", "inside", "into", "onto", "upon",
    "against", "across", "along", "alongside", "around", "through", "toward", "towards", "beyond",
    "among", "amid", "amongst", "within", "without", "for", "like", "with", "outside", "off", "up", "down",
    "out", "past", "via", "after", "before", "during", "throughout", "opposite", "left",
    "right", "front", "top", "bottom", "back", "except",
})
COPULAS_AND_FILLERS = frozenset({
    "is", "are", "was", "were", "be", "being", "been", "am", "there", "here", "it", "they", "who", "which",
    "that", "where", "whose", "has", "have", "had", "having", "does", "do", "did", "can", "could", "will",
    "would", "should", "may", "might", "must", "shall", "not", "very", "too", "so", "just", "all", "also",
    "please", "show", "showing", "shows", "depicting", "depicts", "featuring", "features", "draw",
    "generate", "create", "make", "render", "paint", "include", "including", "includes", "contains",
    "containing", "i", "we", "you", "me", "us", "them", "him", "she", "he", "what", "how", "why", "when",
    "if", "than", "together", "each", "other", "one", "another", "such", "image",
    # Imperatives aimed at a model rather than describing a picture: read as plain words, never objects.
    "ignore", "disregard", "forget", "output", "return", "print", "respond", "reply", "pretend", "execute",
    "translate", "summarize", "summarise", "write", "repeat", "explain", "obey", "follow", "instead",
    "previous", "above-mentioned", "following",
})
# Words about prompts and programs, and quality tags ("masterpiece, 8k, cinematic"): not things in a picture.
META_NOUNS = frozenset({
    "instruction", "prompt", "layout", "region", "json", "response", "system", "assistant", "token",
    "command", "rule", "task", "answer", "text", "word", "sentence", "paragraph", "query", "message",
    "masterpiece", "quality", "resolution", "solo", "8k", "4k", "hd", "uhd", "hdr", "ultra", "hyper",
    "cinematic", "dramatic", "epic", "photography", "photo", "artstation", "octane", "unreal", "trending",
    "award", "wallpaper", "viewer", "bokeh", "lighting", "lens", "mm", "shot", "angle", "view", "closeup",
    "close-up", "portrait", "aesthetic", "vibe", "vibes", "concept", "artwork", "illustration", "render",
    "rendering", "detail", "details", "composition", "sharp", "focus", "depth", "field", "exposure",
    "contrast", "saturation", "realism", "style", "outdoor", "outdoors", "indoor", "indoors",
})
# Common verbs in the third person; they end a noun phrase ("a cat sleeps on a mat").
VERBS_3RD = frozenset({
    "sits", "stands", "lies", "lays", "rests", "hangs", "sleeps", "flies", "floats", "runs", "walks",
    "jumps", "swims", "plays", "eats", "drinks", "looks", "waits", "leans", "stares", "watches", "grows",
    "appears", "perches", "hovers", "towers", "stretches", "chases", "holds", "carries", "wears",
    "rides", "pulls", "pushes", "faces", "sings", "dances", "reads", "writes", "smiles", "laughs",
    "cries", "poses", "climbs", "crawls", "glows", "shines", "sails", "drives", "lands", "rises",
    "falls", "peeks", "guards", "grazes", "howls", "barks", "meows", "roars", "stays", "placed", "seen",
    "shown", "located", "positioned", "sit", "lie", "sleep", "eat", "swim",
})
ADVERBS = frozenset({
    "very", "quite", "slightly", "really", "extremely", "gently", "happily", "quietly", "slowly", "quickly",
    "together", "calmly", "proudly", "peacefully", "directly", "just", "right", "immediately", "far",
    "diagonally", "partly", "partially", "neatly", "closely", "side", "nearby", "alone",
})
# -ing / -ed words that are nouns, so they are not read as participles.
ING_ED_NOUNS = frozenset({
    "building", "painting", "ring", "king", "wing", "string", "pudding", "ceiling", "dumpling",
    "earring", "sling", "swing", "spring", "duckling", "sibling", "wedding", "clothing", "bedding",
    "railing", "sapling", "seedling", "drawing", "rendering", "icing", "frosting", "stocking",
    "awning", "lightning", "ping", "thing", "viking", "herring", "gosling", "evening", "morning",
    "bed", "shed", "sled", "seed", "reed", "steed", "weed", "red", "sofa bed", "bread", "head", "thread",
    "flatbed", "hundred", "tripod", "lipstick", "feed", "speed", "creed", "bobsled", "ling",
    "stuffing", "topping", "filling", "sing", "bling", "pig",
})
# Adjectives and other words that describe but never name the object.
ADJECTIVES = frozenset({
    "big", "small", "large", "little", "tiny", "huge", "giant", "enormous", "massive", "gigantic",
    "tall", "short", "long", "wide", "narrow", "thick", "thin", "fat", "slim", "round", "square", "flat",
    "old", "new", "young", "ancient", "modern", "vintage", "retro", "antique", "futuristic", "rusty",
    "shiny", "fluffy", "furry", "fuzzy", "soft", "hard", "smooth", "rough", "wet", "dry", "hot", "cold",
    "warm", "cool", "cute", "adorable", "beautiful", "pretty", "ugly", "happy", "sad", "angry", "sleepy",
    "hungry", "playful", "curious", "lazy", "skinny", "wooden", "metal", "metallic", "plastic",
    "leather", "ceramic", "glass", "stone", "marble", "paper", "velvet", "silk", "wool", "woolen", "cotton",
    "crystal", "iron", "steel", "copper", "golden", "silver", "brass", "clay", "concrete", "brick",
    "fresh", "ripe", "rotten", "delicious", "tasty", "juicy", "frozen", "melting", "broken", "empty",
    "full", "open", "closed", "clean", "dirty", "wild", "tame", "baby", "majestic", "elegant", "fancy",
    "simple", "plain", "striped", "spotted", "checkered", "patterned", "floral", "transparent",
    "translucent", "glowing", "sparkling", "bright", "dark", "light", "pale", "vivid", "colorful",
    "colourful", "detailed", "intricate", "realistic", "magical", "mystical", "mechanical", "robotic",
    "miniature", "mini", "toy", "bare", "lonely", "friendly", "fierce", "scary", "spooky",
    "heavy", "delicate", "wrinkled", "folded", "stacked", "tilted", "upside", "inflatable",
    "electric", "wireless", "digital", "handmade", "homemade", "lit", "burning", "blooming",
    "cosy", "cozy", "tropical", "steampunk", "cyberpunk", "gothic", "medieval", "victorian", "fantasy",
    "sci-fi", "noir", "surreal", "abstract", "minimalist", "polka-dot", "plaid", "tabby", "calico",
    "chubby", "muscular", "elderly", "hairy", "bald", "bearded", "smiling",
    "sleeping", "running", "jumping", "flying", "swimming", "standing", "sitting", "lying", "wearing",
    "teenage", "grown", "adult", "mature", "rubber", "porcelain", "bamboo", "wicker", "knitted",
    "felt", "fur", "lace", "denim", "tin", "jade", "pearl", "diamond", "nice", "lovely", "gorgeous",
    "stunning", "awesome", "funny", "silly", "cuddly", "grumpy", "brave", "wise",
})
SIZE_WORDS = {
    "tiny": 0.6, "miniature": 0.6, "mini": 0.65, "small": 0.8, "little": 0.8, "short": 0.9,
    "big": 1.25, "large": 1.25, "tall": 1.15, "huge": 1.5, "giant": 1.5, "enormous": 1.5, "massive": 1.5,
    "gigantic": 1.6, "colossal": 1.6,
}
# Nouns that are the setting, not an object to place ("a dog on the beach", "in a kitchen").
SCENE_NOUNS = frozenset({
    "park", "forest", "woods", "wood", "jungle", "beach", "sea", "ocean", "lake", "river", "pond", "field",
    "meadow", "grass", "lawn", "garden", "yard", "backyard", "street", "road", "highway", "city", "town",
    "village", "countryside", "desert", "snow", "sand", "water", "sky", "space", "night", "day", "sunset",
    "sunrise", "dusk", "dawn", "morning", "evening", "afternoon", "background", "foreground", "kitchen",
    "bedroom", "bathroom", "room", "living room", "office", "classroom", "library", "studio", "cafe",
    "restaurant", "market", "shop", "store", "stage", "arena", "stadium", "farm", "valley", "canyon",
    "cave", "underwater", "air", "rain", "fog", "mist", "storm", "moonlight", "sunlight", "light",
    "shadow", "shadows", "landscape", "scenery", "horizon", "world", "universe", "distance", "floor",
    "ground", "surface", "ceiling", "wall", "walls", "sidewalk", "alley", "corridor", "hallway",
    "parking lot", "airport", "station", "harbor", "harbour", "port", "bay", "coast", "shore",
    "hillside", "mountainside", "savanna", "savannah", "prairie", "tundra", "swamp", "marsh", "orchard",
    "vineyard", "zoo", "museum", "interior", "outdoors", "indoors", "setting", "scene", "environment",
    "weather", "winter", "summer", "autumn", "fall", "spring", "daylight", "darkness", "twilight",
    "middle", "center", "centre", "corner", "side", "edge", "top", "bottom", "left", "right", "front",
    "back", "style", "styles", "manner", "way", "color", "colour", "colors", "colours", "detail",
    "details", "quality", "resolution", "lighting", "focus", "bokeh", "composition", "atmosphere", "mood",
    "clearing", "snowfield", "seashore", "seaside", "waves", "surf", "puddle", "mud", "dirt", "soil",
    "pasture", "plain", "plains", "woodland", "rainforest", "wilderness", "hills", "mountains",
    "neighborhood", "neighbourhood", "downtown", "suburb", "battlefield", "playground",
    "courtyard", "square", "plaza", "attic", "basement", "garage", "hall", "church interior", "ice",
    "clouds", "outer space", "galaxy", "cosmos", "heaven", "sea floor", "seabed", "riverbank",
})
# Formation nouns: "in a row", "in a line", "in a circle" arrange a group; they are not objects.
FORMATION_NOUNS = {"row": "row", "line": "row", "column": "column", "stack": "column", "pile": "column",
                   "circle": "grid", "ring": "grid", "group": "grid", "cluster": "grid", "heap": "column"}
# Parts, clothing and accessories: after "with" / "wearing" / "in" they describe the previous object.
PART_NOUNS = frozenset({
    "collar", "hat", "cap", "scarf", "glasses", "sunglasses", "shirt", "t-shirt", "tshirt", "dress",
    "skirt", "jacket", "coat", "sweater", "hoodie", "suit", "uniform", "armor", "armour", "cape", "cloak",
    "helmet", "boots", "boot", "shoes", "shoe", "gloves", "glove", "mask", "necklace", "bracelet", "earrings",
    "earring", "crown", "bow tie", "bowtie", "ribbon", "bow", "tail", "wings", "wing", "horns", "horn",
    "antlers", "ears", "ear", "eyes", "eye", "hair", "fur", "feathers", "spots", "stripes", "patches",
    "mane", "beard", "mustache", "moustache", "smile", "petals", "handle", "handles", "wheels", "lid",
    "buttons", "pattern", "logo", "label", "sticker", "stickers", "decorations", "frosting", "sprinkles",
    "toppings", "topping", "icing", "candles", "sails", "sail", "windows", "roof", "chimney", "apron",
    "vest", "tie", "jeans", "pants", "trousers", "shorts", "sneakers", "socks", "belt", "backpack",
    "blouse", "gown", "robe", "kimono", "tuxedo", "bandana", "headband", "veil", "makeup", "tattoo",
    "tattoos", "freckles", "whiskers", "paws", "claws", "beak", "fins", "scales", "shell", "leash",
    "saddle", "bridle", "flowers", "leaves", "fruit", "fruits", "lights", "snow", "cream", "cherry",
    "door", "doors", "chimneys", "lanterns", "garland", "steam", "smoke", "foam", "sauce", "cheese",
    "bell", "tag", "name tag", "pockets", "pocket", "hood", "trim", "border", "frame", "text", "writing",
    "letters", "face", "faces", "expression", "pose", "outfit", "costume", "clothes", "jewelry",
    "jewellery", "ornaments", "dots", "polka dots", "flame", "flames", "glow", "reflection", "shadow",
})
# Relation phrase -> relation kind. Longest phrases are matched first.
RELATION_PHRASES = {
    "to the left of": "left", "on the left of": "left", "on the left side of": "left",
    "to the left side of": "left", "at the left of": "left", "on the left-hand side of": "left",
    "left of": "left", "to the left-hand side of": "left", "on the lefthand side of": "left",
    "to the right of": "right", "on the right of": "right", "on the right side of": "right",
    "to the right side of": "right", "at the right of": "right", "on the right-hand side of": "right",
    "right of": "right", "to the right-hand side of": "right", "on the righthand side of": "right",
    "above": "above", "over": "above", "higher than": "above", "up above": "above", "high above": "above",
    "hovering over": "above", "floating above": "above", "hanging above": "above", "flying over": "above",
    "flying above": "above", "hovering above": "above", "directly above": "above",
    "on top of": "on", "on": "on", "onto": "on", "upon": "on", "atop": "on", "on the top of": "on",
    "at the top of": "on", "sitting on": "on", "standing on": "on", "lying on": "on", "resting on": "on",
    "perched on": "on", "riding": "on", "rides": "on", "riding on": "on", "mounted on": "on",
    "below": "below", "lower than": "below", "down below": "below", "directly below": "below",
    "at the bottom of": "below", "at the foot of": "below",
    "under": "under", "underneath": "under", "beneath": "under", "directly under": "under",
    "beside": "beside", "next to": "beside", "by": "beside", "near": "beside", "nearby": "beside",
    "alongside": "beside", "close to": "beside", "adjacent to": "beside", "by the side of": "beside",
    "at the side of": "beside", "facing": "beside", "at": "beside", "against": "beside", "besides": "beside",
    "opposite": "beside", "across from": "beside", "near to": "beside", "together with": "beside",
    "along with": "beside",
    "between": "between", "in between": "between", "in the middle of": "between", "amid": "between",
    "amongst": "beside", "among": "beside", "flanked by": "flanked",
    "in front of": "front", "before": "front", "in back of": "behind", "behind": "behind",
    "at the back of": "behind", "at the rear of": "behind",
    "inside": "inside", "in": "inside", "within": "inside", "into": "inside", "inside of": "inside",
    "filled with": "contains", "full of": "contains", "containing": "contains",
    "holding": "holding", "holds": "holding", "carrying": "holding", "carries": "holding",
    "hugging": "holding", "grabbing": "holding", "clutching": "holding", "playing with": "holding",
    "around": "around", "surrounding": "around", "encircling": "around", "circling": "around",
    "surrounded by": "surrounded", "encircled by": "surrounded", "ringed by": "surrounded",
    "with": "with", "wearing": "wearing", "wears": "wearing", "dressed in": "wearing",
}
RELATION_INDEX: dict[str, list[tuple[tuple[str, ...], str]]] = {}
for _phrase, _kind in RELATION_PHRASES.items():
    _words = tuple(_phrase.split())
    RELATION_INDEX.setdefault(_words[0], []).append((_words, _kind))
for _lst in RELATION_INDEX.values():
    _lst.sort(key=lambda item: -len(item[0]))

PEOPLE_NOUNS = frozenset({
    "person", "man", "woman", "boy", "girl", "child", "kid", "baby", "toddler", "lady", "gentleman", "king",
    "queen", "prince", "princess", "knight", "soldier", "wizard", "witch", "astronaut", "chef", "doctor",
    "nurse", "student", "teacher", "dancer", "musician", "farmer", "firefighter", "pirate", "cowboy",
    "clown", "player", "warrior", "monk", "mermaid", "fisherman", "policeman", "fireman",
})
# Sky objects sit high in a picture unless the prompt says otherwise.
SKY_NOUNS = frozenset({"moon", "sun", "star", "cloud", "rainbow", "planet", "kite", "airplane", "plane",
                       "jet", "helicopter", "hot air balloon", "drone", "eagle", "hawk", "comet", "ufo"})
# Nouns that hold things ("three apples in a bowl": the apples go inside the bowl's box).
CONTAINER_NOUNS = frozenset({
    "bowl", "box", "basket", "vase", "cup", "mug", "jar", "bag", "bucket", "cage", "pot", "glass",
    "nest", "tank", "aquarium", "crate", "drawer", "boat", "cart", "wagon", "car", "truck", "bottle",
    "teacup", "plate", "tray", "pan", "wine glass", "suitcase", "backpack", "handbag", "bin", "sink",
    "bathtub", "tub", "pool", "crib", "stroller", "barrel", "shelf", "bookshelf", "bookcase", "tree",
    "window", "frame", "picture frame", "hand", "hands", "pocket", "envelope", "fishbowl",
    "house", "tent", "bed", "couch", "sofa", "chair", "armchair", "hat", "shoe", "boot", "cabinet",
})
# Portion words: "a slice of pizza" names the pizza.
PORTION_NOUNS = frozenset({"slice", "piece", "bite", "chunk", "wedge", "scoop", "bar", "loaf", "sprig",
                           "stick", "strip", "cube", "serving", "portion", "half", "bunch"})
