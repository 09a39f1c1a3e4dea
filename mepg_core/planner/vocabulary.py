"""What kind of thing a noun names: boxable (person, animal, plant, food, object), part of a wearer, scenery
or an abstraction. WordNet's lexical files give the class of every common noun (data/wordnet_nouns.txt,
built by tools/build_noun_classes.py); the short curated lists below settle what WordNet files as
artifacts but a picture treats as setting (rooms, streets, walls) or as something worn (hats, dresses).
"""

from __future__ import annotations

import os
from functools import lru_cache

from . import lexicon as lx

_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "wordnet_nouns.txt")

# Letter codes of data/wordnet_nouns.txt (tools/build_noun_classes.py writes the same).
_BOXABLE_CODES = {"P": "person", "A": "animal", "V": "plant", "R": "thing", "F": "food", "O": "thing"}
# group, substance, quantity, top, attribute, shape, communication ("folder", "book"): look at the next senses
_WEAK_FIRST = set("gSqTbsC")

# Worn or grown: an attribute of its wearer, never its own region when a wearer is named.
WORN = frozenset(lx.PART_NOUNS | {
    "raincoat", "overcoat", "trenchcoat", "beanie", "sneaker", "heel", "heels", "sandal", "sandals",
    "bikini", "swimsuit", "jersey", "cardigan", "parka", "poncho", "tunic", "turban", "hijab", "sari",
    "shawl", "mitten", "mittens", "pajamas", "pyjamas", "headscarf", "beret", "fedora", "sombrero",
    "top hat", "bowler hat", "baseball cap", "goggles", "earmuffs", "wristwatch", "ring", "pendant",
    "badge", "brooch", "monocle", "eyepatch", "tiara", "wig", "ponytail", "braid", "braids", "bun",
    "pigtails", "tank top", "overalls", "leggings", "stockings", "tights", "blazer", "waistcoat",
    "corset", "armour", "armor", "gauntlet", "gauntlets", "scarf", "collar", "leash", "harness",
    "sleeve", "sleeves", "hem", "lapel", "cuff", "cuffs", "glove", "gloves", "outfit", "attire",
    "garment", "garments", "clothing", "apparel", "uniform", "costume", "helmet", "visor", "mask",
    "lipstick", "eyeliner", "nail", "nails", "skin", "complexion", "hairstyle", "haircut", "curls",
    "bangs", "fringe", "bob", "mohawk", "dreadlocks", "locks", "strands", "coat", "jacket", "suit",
    "paint", "finish", "surface", "texture", "coating", "sheen", "plumage", "fleece", "hide",
    "body", "head", "hand", "hands", "arm", "arms", "leg", "legs", "face", "eye", "eyes", "nose",
    "mouth", "lips", "cheek", "cheeks", "neck", "shoulder", "shoulders", "back", "chest", "belly",
    "finger", "fingers", "foot", "feet", "toe", "toes", "knee", "knees", "wrist", "ear", "ears",
    "tail", "paw", "paws", "wing", "wings", "horn", "horns", "antler", "antlers", "trunk", "tusk",
    "tusks", "fin", "fins", "feather", "feathers", "beak", "claw", "claws", "whisker", "whiskers",
    "mane", "fur", "hair", "beard", "moustache", "mustache", "tattoo", "tattoos", "freckle", "freckles",
    "screen", "display", "keypad", "button", "buttons", "dial", "knob", "handle", "lid", "spout",
    "blade", "strap", "straps", "wheel", "wheels", "tire", "tires", "tyre", "tyres", "hood", "roof",
    "bumper", "headlight", "headlights", "windshield", "door", "doors", "window", "windows",
    "chimney", "porch", "balcony", "facade", "frame", "edge", "corner", "rim", "base", "side",
    "label", "logo", "lettering", "inscription", "engraving", "pattern", "print", "stripe", "stripes",
    "spot", "spots", "dot", "dots", "petal", "petals", "stem", "stems", "leaf", "leaves", "branch",
    "branches", "bark", "root", "roots", "thorn", "thorns", "crust", "icing", "frosting", "topping",
    "toppings", "sprinkles", "filling", "cap", "hat", "dress", "shirt", "skirt", "kimono", "robe",
})
# Parts and surfaces of objects: their owner's words when the prompt ties them to it ("its keys", "with
# golden clasps", "the bark of the tree"); a thing of its own otherwise.
PARTS = frozenset({
    "screen", "display", "keypad", "button", "buttons", "dial", "knob", "handle", "lid", "spout", "blade",
    "strap", "straps", "wheel", "wheels", "tire", "tires", "tyre", "tyres", "hood", "roof", "bumper",
    "headlight", "headlights", "windshield", "door", "doors", "window", "windows", "chimney", "porch",
    "balcony", "facade", "frame", "edge", "corner", "rim", "base", "side", "label", "logo", "lettering",
    "inscription", "engraving", "pattern", "print", "stripe", "stripes", "spot", "spots", "dot", "dots",
    "petal", "petals", "stem", "stems", "leaf", "leaves", "branch", "branches", "bark", "root", "roots",
    "thorn", "thorns", "crust", "icing", "frosting", "topping", "toppings", "sprinkles", "filling",
    "paint", "finish", "surface", "texture", "coating", "sheen", "grain", "clasp", "clasps", "binding",
    "bindings", "lace", "laces", "bristle", "bristles", "pit", "flesh", "seed", "seeds", "key", "keys",
    "string", "strings", "fabric", "patch", "patches", "mix", "tuft", "pigment", "pigments", "varnish",
    "trim", "detailing", "details", "accent", "accents", "ornament", "ornaments", "decoration",
    "decorations", "carving", "carvings", "pendulum", "face", "hands", "needle", "cord", "cable", "plug",
    "sole", "soles", "heel", "toe", "toes", "cushion", "cushions", "seat", "backrest", "armrest", "leg",
    "legs", "shelf", "shelves", "drawer", "drawers", "panel", "panels", "lens", "body", "neck", "cap",
    "cork", "peel", "skin", "rind", "shell", "core", "juice", "foam", "steam", "bubbles",
    "icon", "icons", "letters", "words", "text", "numbers", "digits", "markings", "hinge", "lock",
})
# Scenery and setting: the global prompt's business (a planner may box some of them as background).
SCENERY = frozenset(lx.SCENE_NOUNS | {
    "mountain", "mountains", "hill", "hills", "sky", "skies", "sea", "ocean", "forest", "street", "room",
    "field", "wall", "walls", "beach", "shore", "shores", "lake", "river", "road", "path", "trail",
    "meadow", "grassland", "cityscape", "skyline", "backdrop", "terrain",
    "dune", "dunes", "glacier", "ridge", "peaks", "slope", "slopes", "waves", "wave", "tide",
    "horizon", "scene", "setting", "surroundings", "landscape", "view", "vista", "panorama", "space",
    "floorboards", "tiles", "wallpaper",
    "curtain", "curtains", "interior", "exterior", "backyard", "pavement", "cobblestones", "lawn",
    "grass", "snow", "water", "sand", "ice", "mud", "rain", "fog", "mist", "haze", "smoke", "steam",
    "cloud", "clouds", "aurora", "bank", "riverbank", "greenery", "foliage", "vegetation", "flooring",
    "setup", "visual", "visuals", "lunch", "dinner", "breakfast", "meal", "accessory", "accessories",
    "beam", "beams", "ray", "rays", "auditorium", "row", "line", "circle", "sunbeam", "spotlight",
    "lights", "northern lights", "stars", "starry", "galaxy", "nebula", "flame", "flames", "fire", "sparks",
    "embers", "lightning", "rainbow", "sunshine", "spray", "splash", "ripple", "ripples", "puddle",
    "universe", "cosmos", "atmosphere", "ambience", "ambiance", "mood", "air", "breeze", "wind",
    "sunlight", "moonlight", "daylight", "light", "glow", "shadow", "shadows", "silhouette",
    "reflection", "reflections", "hue", "hues", "tone", "tones", "color", "colour", "palette",
    "sunset", "sunrise", "dusk", "dawn", "twilight", "night", "day", "evening", "morning", "noon",
    "afternoon", "midnight", "season", "weather", "ground", "floor", "ceiling", "background",
    "foreground", "distance", "area", "place", "spot", "location", "environment", "world", "realm",
    "pool", "pond", "stream", "creek", "waterfall", "canal", "harbor", "harbour", "dock", "pier",
    "alley", "avenue", "boulevard", "crosswalk", "intersection", "square", "plaza", "market",
    "bazaar", "village", "town", "city", "metropolis", "suburb", "countryside", "farmland", "valley",
    "canyon", "desert", "jungle", "woods", "woodland", "rainforest", "savanna", "swamp", "marsh",
    "orchard", "vineyard", "garden", "park", "yard", "courtyard", "terrace", "patio", "rooftop",
    "kitchen", "bedroom", "bathroom", "living room", "dining room", "office", "studio", "classroom",
    "library", "hallway", "corridor", "lobby", "cafe", "restaurant", "bar", "shop", "store",
    "bakery", "workshop", "laboratory", "lab", "attic", "basement", "cellar", "garage", "stage",
    "arena", "stadium", "gym", "church", "cathedral", "temple", "palace", "hall", "chamber",
})
# Scenery that a thing can stand in front of, fly above or sit beside: boxed (as background) only then.
BACKDROPS = frozenset({
    "city", "village", "town", "skyline", "cityscape", "metropolis", "waterfall", "mountain", "mountains",
    "hill", "forest", "woods", "pier", "dock", "harbor", "harbour", "canyon", "temple", "palace", "cathedral",
    "church", "stage",
})
# Words about the picture or the prompt, not things in it.
META = frozenset(lx.META_NOUNS | {
    "style", "styles", "art", "artwork", "painting", "drawing", "illustration", "image", "picture",
    "photo", "photograph", "photography", "render", "rendering", "shot", "closeup", "close-up",
    "portrait", "scene", "composition", "detail", "details", "quality", "masterpiece", "resolution",
    "lighting", "focus", "bokeh", "camera", "lens", "perspective", "angle", "frame", "version", "sense",
    "feeling", "vibe", "aesthetic", "theme", "concept", "design", "effect", "contrast", "tone",
    "kind", "type", "sort", "variety", "array", "assortment", "collection", "arrangement", "display",
    "selection", "series", "number", "lot", "lots", "plenty", "bunch", "group", "pair", "couple",
    "set", "side", "part", "half", "middle", "center", "centre", "top", "bottom", "left", "right",
    "front", "rear", "foreground", "background", "edge", "corner", "one", "ones", "other", "others",
    "each", "both", "all", "none", "something", "nothing", "everything", "anything", "thing",
    "things", "stuff", "item", "items", "object", "objects", "element", "elements", "piece",
    "presence", "appearance", "shape", "form", "figure", "size", "way", "manner", "moment", "time",
    "touch", "hint", "splash", "dash", "sea of", "air", "use", "hd", "uhd", "8k", "4k", "dslr",
    "film", "selfie", "vignette", "material", "materials", "layer", "layers", "mark", "marks", "scuff",
    "scuffs", "wisp", "wisps", "strip", "strips", "doodle", "doodles", "spice", "spices", "powder",
    "nature", "mound", "spray", "cling", "lie", "pop", "up", "passersby", "mix", "blend",
})
# Printed things WordNet files under communication first.
PRINTED = frozenset({"book", "magazine", "newspaper", "map", "poster", "letter", "card", "postcard",
                     "note", "sign", "signboard", "menu", "envelope", "notebook", "diary", "calendar",
                     "banner", "flag", "ticket", "scroll", "comic book", "album", "record"})
# Words that name a kind of thing already named ("the vehicle" after "a pickup truck").
GENERIC = frozenset({"vehicle", "vegetable", "veggie", "instrument", "animal", "creature", "beast", "toy",
                     "fruit", "berry", "furniture", "accessory", "device", "gadget", "appliance", "tool", "container",
                     "footwear", "garment", "food", "structure", "machine", "equipment", "figure", "item",
                     "object", "product", "supplies", "bird", "pet", "plant", "flower", "vessel", "craft",
                     "piece", "pair", "duo", "trio", "group", "subject", "character", "individual",
                     "companion", "friend", "companions", "friends", "pal", "buddy", "mammal", "insect",
                     "utensil", "ware", "dish", "treat", "snack", "dessert", "drink", "beverage", "stuffed animal"})
# Plurals where a picture usually shows a few.
DEFAULT_PLURAL_COUNT = 3


@lru_cache(maxsize=1)
def _wordnet() -> dict[str, str]:
    table: dict[str, str] = {}
    with open(_DATA, encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("#"):
                continue
            lemma, _, codes = line.rstrip("\n").partition("\t")
            table[lemma] = codes
    return table


@lru_cache(maxsize=1)
def _not_nouns() -> frozenset[str]:
    path = os.path.join(os.path.dirname(_DATA), "wordnet_not_nouns.txt")
    with open(path, encoding="utf-8") as fh:
        return frozenset(line.strip() for line in fh if line.strip() and not line.startswith("#"))


def is_not_noun(word: str) -> bool:
    """True for a word WordNet knows only as an adjective, verb or adverb ("complete", "sparse")."""
    return word.lower() in _not_nouns()


def wordnet_codes(lemma: str) -> str | None:
    """WordNet lexical-file codes of ``lemma``'s first senses, or None for a word WordNet lacks."""
    return _wordnet().get(lemma.lower())


def is_known_noun(phrase: str) -> bool:
    """True for a noun (or multi-word noun such as "wine glass") WordNet or the lexicon knows."""
    return phrase in _wordnet() or phrase in lx.known_nouns()


CLOTHING_ENDINGS = ("dress", "shirt", "coat", "suit", "jacket", "gown", "hat", "cap", "skirt", "pants",
                    "trousers", "shoes", "shoe", "boots", "boot", "sweater", "hoodie", "jeans", "vest", "robe",
                    "kimono", "uniform", "scarf", "gloves", "socks", "sneakers", "sandals", "blouse", "apron",
                    "cloak", "cape", "helmet", "mask", "goggles", "jumper", "cardigan", "tights", "leggings",
                    "shorts", "overalls", "bonnet", "beanie", "turban", "headband", "necklace", "earrings",
                    "bracelet", "armor", "armour", "costume", "outfit", "attire", "wear")


def is_clothing(word: str) -> bool:
    """Clothing by its word: "sundress", "raincoat", "tracksuit", "sweatshirt", "top hat"."""
    w = word.lower()
    return w.endswith(CLOTHING_ENDINGS) and w not in ("hatch", "capsule", "boot") or w in WORN and w not in PARTS


@lru_cache(maxsize=8192)
def classify(lemma: str) -> str:
    """The class of a singular noun: person, animal, plant, food, thing (boxable), worn (an attribute of
    its wearer), scenery, meta, abstract, or unknown (WordNet lacks it)."""
    word = lemma.lower()
    if word in META:
        return "meta"
    if word in SCENERY:
        return "scenery"
    if word in WORN and word not in PARTS:
        return "worn"
    if word in PARTS:
        return "part"
    codes = wordnet_codes(word)
    if word in lx.PEOPLE_NOUNS:
        return "person"
    if word in lx.NOUN_SHAPES or word in lx.geneval_object_names() or word in PRINTED:
        return next((_BOXABLE_CODES[c] for c in (codes or "R") if c in _BOXABLE_CODES), "thing")
    if codes is None:
        return "abstract" if is_not_noun(word) else "unknown"
    first = codes[0]
    if first in _BOXABLE_CODES:
        return _BOXABLE_CODES[first]
    if first == "B":
        return "worn"
    if first in _WEAK_FIRST:
        for code in codes[1:]:
            if code in _BOXABLE_CODES:
                return _BOXABLE_CODES[code]
    if first == "L":
        return "scenery"
    return "abstract"


BOXABLE = frozenset({"person", "animal", "plant", "food", "thing", "unknown"})
SKY_THINGS = frozenset({"sun", "moon", "star", "stars", "planet"})


def is_boxable(lemma: str) -> bool:
    return classify(lemma) in BOXABLE
