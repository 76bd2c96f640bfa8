"""A deterministic, procedurally generated product catalog and the shopping goals built on it.

The catalog mimics the fields WebShop's scraped products carry (asin, category, product_category
path, query, Title, Attributes, options, price, BulletPoints, Description, Reviews) without any
download: `build_catalog(seed, num_products)` makes the same catalog for the same arguments.

Product text (title, bullet points, description) mentions a product's own attributes and never
another attribute of its type's pool, so WebShop's "attribute found in the text" fallback of the
reward cannot give credit for an attribute the product lacks. Option values are not part of that
text (they are still indexed for search).

Goals follow WebShop's synthetic goals: a target product, some of its attributes, one value of
each of its option groups and a price cap a little above its price. Splits:
  * train / eval_seen: attributes outside the held-out (product type, attribute) pairs; the two
    splits draw their target products from disjoint product sets;
  * eval_unseen: every instruction targets at least one held-out (product type, attribute) pair,
    a combination no train or eval_seen instruction ever asks for.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass, field

#: Separator of WebShop's product_category paths.
PATH_SEP = " › "
#: Tasks per split; the sum (12,087) and the eval sizes mirror WebShop's human-goal splits.
SPLIT_SIZES: dict[str, int] = {"train": 10587, "eval_seen": 1000, "eval_unseen": 500}
#: Share of the products whose goals belong to eval_seen rather than train.
EVAL_TARGET_SHARE = 0.15
#: Held-out attributes per product type (targeted by eval_unseen goals only).
HELD_OUT_PER_TYPE = 2
#: WebShop's price caps: multiples of 10 dollars.
PRICE_STEPS = [10.0 * i for i in range(1, 100)]
NO_PRICE_CAP = 1_000_000.0

DEFAULT_SEED = 0
DEFAULT_NUM_PRODUCTS = 6000


@dataclass(frozen=True)
class ProductType:
    """A kind of product: its name is also WebShop's `query` and `name` of its products."""

    name: str
    category: str
    path: tuple[str, ...]
    base_price: float
    attributes: tuple[str, ...]
    option_groups: tuple[tuple[str, tuple[str, ...]], ...]


@dataclass(frozen=True, eq=False)
class Product:
    """One catalog entry; field meanings follow WebShop's product dicts."""

    asin: str
    category: str
    product_category: str
    query: str
    name: str
    title: str
    attributes: tuple[str, ...]
    options: dict[str, tuple[str, ...]]
    price: float
    bullet_points: tuple[str, ...]
    description: str
    rating: str
    reviews: tuple[tuple[str, int, str], ...]  # (title, stars, body)

    @functools.cached_property
    def text(self) -> str:
        """Title, features and description, lower-cased: where attributes may be mentioned."""
        return " \n ".join((self.title, *self.bullet_points, self.description)).lower()


@dataclass(frozen=True, eq=False)
class Goal:
    """What an instruction asks for; `asin` is the product it was generated from."""

    asin: str
    category: str
    product_category: str
    query: str
    name: str
    attributes: tuple[str, ...]
    options: dict[str, str]
    price_upper: float
    instruction: str


def _opt(name: str, *values: str) -> tuple[str, tuple[str, ...]]:
    return name, values


_APPAREL_SIZE = _opt("size", "small", "medium", "large", "x-large", "xx-large")
_SHOE_SIZE = _opt("size", "6", "7", "8", "9", "10", "11", "12", "13")
_APPAREL_COLOR = _opt(
    "color", "black", "white", "navy", "grey", "olive", "burgundy", "khaki", "charcoal", "teal"
)
_GADGET_COLOR = _opt("color", "black", "white", "silver", "space grey", "blue", "rose gold")
_WOOD_COLOR = _opt("color", "walnut", "white", "black", "oak", "grey", "espresso", "natural")
_FOOD_COUNT = _opt("count", "pack of 1", "pack of 2", "pack of 4", "pack of 6", "pack of 12")
_LIQUID_SIZE = _opt("size", "1 fl oz", "1.7 fl oz", "3.4 fl oz", "8 fl oz", "16 fl oz")
_SCENT = _opt("scent", "lavender", "coconut", "citrus", "vanilla", "unscented", "rose", "mint")
_FOOD_WEIGHT = _opt("size", "8 ounce", "12 ounce", "16 ounce", "2 pound", "5 pound")

_BEAUTY_ATTRS = (
    "paraben free", "cruelty free", "long lasting", "alcohol free", "vegan",
    "dermatologist tested", "travel size", "natural ingredients", "hypoallergenic",
    "non greasy",
)
_HAIR_ATTRS = (
    "sulfate free", "paraben free", "cruelty free", "vegan", "natural ingredients",
    "color safe", "travel size", "dermatologist tested", "anti frizz", "hydrating",
)
_TECH_ATTRS = (
    "fast charging", "long battery life", "usb c", "wireless charging", "high definition",
    "ergonomic design", "lightweight", "plug and play", "built in microphone", "rechargeable",
    "compact design", "aluminum alloy", "noise cancelling", "water resistant",
)
_GARMENT_ATTRS = (
    "machine wash", "moisture wicking", "quick drying", "breathable", "relaxed fit",
    "slim fit", "cotton blend", "polyester spandex", "long sleeve", "button closure",
    "zipper closure", "hand wash", "high waist", "elastic waistband",
)
_SHOE_ATTRS = (
    "slip resistant", "breathable", "rubber sole", "lace up", "memory foam", "lightweight",
    "arch support", "waterproof", "wide width", "cushioned insole",
)
_FOOD_ATTRS = (
    "gluten free", "sugar free", "low carb", "non gmo", "usda organic", "keto friendly",
    "high protein", "dairy free", "kosher certified", "individually wrapped", "plant based",
    "low sodium", "fair trade", "no artificial flavors", "shelf stable",
)
_FURNITURE_ATTRS = (
    "easy assembly", "solid wood", "metal frame", "storage space", "adjustable height",
    "space saving", "mid century modern", "engineered wood", "high gloss", "faux leather",
    "easy clean", "stain resistant", "rustic style", "living room",
)


def _types(
    category: str, root: str, rows: list[tuple[str, str, float, tuple[str, ...], tuple]]
) -> list[ProductType]:
    return [
        ProductType(name, category, (root, sub, name.title()), price, attrs, tuple(groups))
        for name, sub, price, attrs, groups in rows
    ]


PRODUCT_TYPES: tuple[ProductType, ...] = tuple(
    _types("beauty", "Beauty & Personal Care", [
        ("shampoo", "Hair Care", 14.0, _HAIR_ATTRS, (_LIQUID_SIZE, _SCENT)),
        ("conditioner", "Hair Care", 15.0, _HAIR_ATTRS, (_LIQUID_SIZE, _SCENT)),
        ("hair oil", "Hair Care", 18.0, _HAIR_ATTRS, (_LIQUID_SIZE,)),
        ("face moisturizer", "Skin Care", 24.0, _BEAUTY_ATTRS, (_LIQUID_SIZE, _SCENT)),
        ("sunscreen", "Skin Care", 16.0, _BEAUTY_ATTRS, (_LIQUID_SIZE,)),
        ("body lotion", "Skin Care", 12.0, _BEAUTY_ATTRS, (_LIQUID_SIZE, _SCENT)),
        ("lipstick", "Makeup", 13.0, _BEAUTY_ATTRS,
         (_opt("color", "nude", "ruby", "coral", "berry", "mauve", "plum", "pink"),)),
        ("foundation", "Makeup", 28.0, _BEAUTY_ATTRS,
         (_opt("color", "ivory", "beige", "sand", "honey", "espresso", "caramel"),
          _LIQUID_SIZE)),
        ("mascara", "Makeup", 11.0, _BEAUTY_ATTRS,
         (_opt("color", "black", "brown", "blue"),)),
    ])
    + _types("electronics", "Electronics", [
        ("wireless earbuds", "Headphones", 45.0, _TECH_ATTRS, (_GADGET_COLOR,)),
        ("over ear headphones", "Headphones", 70.0, _TECH_ATTRS, (_GADGET_COLOR,)),
        ("bluetooth speaker", "Portable Audio", 40.0, _TECH_ATTRS, (_GADGET_COLOR,)),
        ("computer mouse", "Computer Accessories", 22.0, _TECH_ATTRS, (_GADGET_COLOR,)),
        ("mechanical keyboard", "Computer Accessories", 60.0, _TECH_ATTRS,
         (_GADGET_COLOR, _opt("style", "full size", "tenkeyless", "60 percent"))),
        ("laptop stand", "Computer Accessories", 30.0, _TECH_ATTRS, (_GADGET_COLOR,)),
        ("portable charger", "Power Accessories", 28.0, _TECH_ATTRS,
         (_GADGET_COLOR, _opt("capacity", "5000mah", "10000mah", "20000mah", "26800mah"))),
        ("security camera", "Camera & Photo", 55.0, _TECH_ATTRS,
         (_opt("count", "1 camera", "2 cameras", "3 cameras", "4 cameras"),)),
        ("smart watch", "Wearable Technology", 90.0, _TECH_ATTRS,
         (_GADGET_COLOR, _opt("size", "38mm", "41mm", "44mm", "45mm"))),
    ])
    + _types("fashion", "Clothing, Shoes & Jewelry", [
        ("running shoes", "Shoes", 65.0, _SHOE_ATTRS, (_APPAREL_COLOR, _SHOE_SIZE)),
        ("hiking boots", "Shoes", 85.0, _SHOE_ATTRS, (_APPAREL_COLOR, _SHOE_SIZE)),
        ("sneakers", "Shoes", 55.0, _SHOE_ATTRS, (_APPAREL_COLOR, _SHOE_SIZE)),
        ("hoodie", "Clothing", 35.0, _GARMENT_ATTRS, (_APPAREL_COLOR, _APPAREL_SIZE)),
        ("t-shirt", "Clothing", 16.0, _GARMENT_ATTRS, (_APPAREL_COLOR, _APPAREL_SIZE)),
        ("yoga pants", "Clothing", 25.0, _GARMENT_ATTRS, (_APPAREL_COLOR, _APPAREL_SIZE)),
        ("jeans", "Clothing", 40.0, _GARMENT_ATTRS,
         (_opt("color", "light wash", "dark wash", "black", "stone"), _APPAREL_SIZE)),
        ("winter jacket", "Clothing", 80.0, _GARMENT_ATTRS, (_APPAREL_COLOR, _APPAREL_SIZE)),
        ("maxi dress", "Clothing", 38.0, _GARMENT_ATTRS, (_APPAREL_COLOR, _APPAREL_SIZE)),
    ])
    + _types("food", "Grocery & Gourmet Food", [
        ("protein bar", "Snacks", 20.0, _FOOD_ATTRS,
         (_opt("flavor", "chocolate", "peanut butter", "cookie dough", "mixed berry", "vanilla"),
          _FOOD_COUNT)),
        ("ground coffee", "Beverages", 14.0, _FOOD_ATTRS,
         (_opt("flavor", "dark roast", "medium roast", "hazelnut", "french vanilla"),
          _FOOD_WEIGHT)),
        ("green tea", "Beverages", 9.0, _FOOD_ATTRS,
         (_opt("flavor", "jasmine", "matcha", "lemon", "original"), _FOOD_COUNT)),
        ("trail mix", "Snacks", 11.0, _FOOD_ATTRS,
         (_opt("flavor", "sweet and salty", "tropical", "nut lovers", "original"),
          _FOOD_WEIGHT)),
        ("dark chocolate", "Candy", 8.0, _FOOD_ATTRS,
         (_opt("flavor", "sea salt", "almond", "orange", "mint", "original"), _FOOD_COUNT)),
        ("beef jerky", "Snacks", 13.0, _FOOD_ATTRS,
         (_opt("flavor", "teriyaki", "peppered", "original", "sweet and spicy"), _FOOD_WEIGHT)),
        ("olive oil", "Pantry", 17.0, _FOOD_ATTRS, (_FOOD_WEIGHT,)),
        ("granola", "Breakfast", 9.0, _FOOD_ATTRS,
         (_opt("flavor", "honey almond", "blueberry", "cinnamon", "original"), _FOOD_COUNT)),
        ("hot sauce", "Pantry", 7.0, _FOOD_ATTRS,
         (_opt("flavor", "habanero", "chipotle", "garlic", "ghost pepper"), _FOOD_COUNT)),
    ])
    + _types("furniture", "Home & Kitchen", [
        ("office chair", "Furniture", 120.0, _FURNITURE_ATTRS, (_WOOD_COLOR,)),
        ("bookshelf", "Furniture", 80.0, _FURNITURE_ATTRS,
         (_WOOD_COLOR, _opt("size", "3 tier", "4 tier", "5 tier"))),
        ("coffee table", "Furniture", 95.0, _FURNITURE_ATTRS, (_WOOD_COLOR,)),
        ("nightstand", "Furniture", 60.0, _FURNITURE_ATTRS, (_WOOD_COLOR,)),
        ("tv stand", "Furniture", 110.0, _FURNITURE_ATTRS,
         (_WOOD_COLOR, _opt("size", "48 inch", "55 inch", "65 inch", "70 inch"))),
        ("bar stool", "Furniture", 70.0, _FURNITURE_ATTRS,
         (_WOOD_COLOR, _opt("count", "set of 2", "set of 3", "set of 4"))),
        ("floor lamp", "Lighting", 50.0, _FURNITURE_ATTRS, (_WOOD_COLOR,)),
        ("area rug", "Home Decor", 65.0, _FURNITURE_ATTRS,
         (_opt("color", "ivory", "grey", "navy", "beige", "multi"),
          _opt("size", "3x5", "5x7", "8x10", "9x12"))),
        ("shoe rack", "Storage & Organization", 30.0, _FURNITURE_ATTRS, (_WOOD_COLOR,)),
    ])
)
CATEGORIES: tuple[str, ...] = tuple(dict.fromkeys(t.category for t in PRODUCT_TYPES))

_BRAND_HEADS = ("Lu", "Ve", "Ka", "Mo", "Ta", "Ri", "So", "Ze", "Ni", "Bo", "Qu", "Fa", "Ho")
_BRAND_TAILS = ("nera", "lora", "vix", "rado", "lune", "ssa", "mek", "tora", "vanti", "plex")
_LINES = (
    "Classic", "Essential", "Select", "Signature", "Pro", "Plus", "Max", "Lite", "Prime",
    "Studio", "Everyday", "Urban", "Nova", "Core", "Elite",
)
_FEATURE_TEMPLATES = (
    "{A}: crafted to be {a} for everyday use",
    "{A} - a customer favorite for good reason",
    "Designed with care: {a}",
    "{A}, tested by our quality team",
)
_GENERIC_FEATURES = (
    "Satisfaction guaranteed - contact our support team with any questions",
    "Ships in recyclable packaging",
    "Backed by a one year warranty",
)
_REVIEW_BODIES = (
    (5, "Exactly what I was looking for", "Works as described and arrived on time."),
    (4, "Good value", "Pretty good for the price, would buy again."),
    (3, "It is okay", "Does the job but nothing special."),
    (2, "Not for me", "Did not meet my expectations."),
)
_INSTRUCTION_TEMPLATES = (
    "i need {type} that is {attrs}",
    "i am looking for {type} with {attrs}",
    "find me {attrs} {type}",
    "i want to buy {type} which is {attrs}",
    "i would like {attrs} {type}",
)


def _join(words: list[str] | tuple[str, ...]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _make_product(rng: random.Random, ptype: ProductType, asin: str, brand: str) -> Product:
    attrs = tuple(rng.sample(ptype.attributes, rng.randint(3, 5)))
    line = rng.choice(_LINES)
    title_attrs = " ".join(a.title() for a in attrs[:2])
    title = f"{brand} {line} {title_attrs} {ptype.name.title()}"
    if rng.random() < 0.5:
        title += f", {attrs[2].title()}"
    # Most products offer every option group of their type, with a subset of its values; a
    # few offer no options at all, as some WebShop products do.
    options: dict[str, tuple[str, ...]] = {}
    if rng.random() >= 0.08:
        for group, values in ptype.option_groups:
            chosen = set(rng.sample(values, rng.randint(2, len(values))))
            options[group] = tuple(v for v in values if v in chosen)
    features = [
        rng.choice(_FEATURE_TEMPLATES).format(A=a.capitalize(), a=a) for a in attrs
    ] + [rng.choice(_GENERIC_FEATURES)]
    description = (
        f"The {brand} {line} {ptype.name} is {_join(attrs)}. "
        f"Part of our {line.lower()} collection of {ptype.path[1].lower()} products."
    )
    picked = rng.sample(_REVIEW_BODIES, rng.randint(0, 3))
    reviews = tuple((head, stars, body) for stars, head, body in picked)
    rating = f"{sum(r[1] for r in reviews) / len(reviews):.1f}" if reviews else "N.A."
    price = round(max(2.0, ptype.base_price * rng.uniform(0.55, 1.9)), 0) - 0.01
    return Product(
        asin=asin,
        category=ptype.category,
        product_category=PATH_SEP.join(ptype.path),
        query=ptype.name,
        name=ptype.name,
        title=title,
        attributes=attrs,
        options=options,
        price=price,
        bullet_points=tuple(features),
        description=description,
        rating=rating,
        reviews=reviews,
    )


@dataclass(eq=False)
class Catalog:
    """The products of one seed, with the indexes that goal generation needs."""

    seed: int
    products: list[Product]
    by_asin: dict[str, Product] = field(init=False)
    held_out: dict[str, frozenset[str]] = field(init=False)
    _eval_targets: frozenset[str] = field(init=False)
    _eligible: dict[tuple[str, str], list[Product]] = field(init=False)

    def __post_init__(self) -> None:
        self.by_asin = {p.asin: p for p in self.products}
        rng = random.Random(f"webshop-splits/{self.seed}")
        self.held_out = {
            t.name: frozenset(rng.sample(t.attributes, HELD_OUT_PER_TYPE)) for t in PRODUCT_TYPES
        }
        asins = [p.asin for p in self.products]
        self._eval_targets = frozenset(
            rng.sample(asins, int(len(asins) * EVAL_TARGET_SHARE))
        )
        self._eligible = {}
        for p in self.products:
            held = self.held_out[p.query]
            if any(a in held for a in p.attributes):
                self._eligible.setdefault(("eval_unseen", p.query), []).append(p)
            if any(a not in held for a in p.attributes):
                split = "eval_seen" if p.asin in self._eval_targets else "train"
                self._eligible.setdefault((split, p.query), []).append(p)

    def eligible_targets(self, split: str, type_name: str) -> list[Product]:
        """Products of `type_name` that goals of `split` may target."""
        return self._eligible.get((split, type_name), [])


@functools.lru_cache(maxsize=4)
def build_catalog(seed: int = DEFAULT_SEED, num_products: int = DEFAULT_NUM_PRODUCTS) -> Catalog:
    """The catalog for `seed`: `num_products` products spread evenly over the product types."""
    rng = random.Random(f"webshop-catalog/{seed}")
    brands = [h + t for h in _BRAND_HEADS for t in _BRAND_TAILS]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    seen: set[str] = set()
    products = []
    for i in range(num_products):
        asin = "B0" + "".join(rng.choices(alphabet, k=8))
        while asin in seen:
            asin = "B0" + "".join(rng.choices(alphabet, k=8))
        seen.add(asin)
        ptype = PRODUCT_TYPES[i % len(PRODUCT_TYPES)]
        products.append(_make_product(rng, ptype, asin, rng.choice(brands)))
    return Catalog(seed, products)


def price_cap(rng: random.Random, price: float) -> float:
    """WebShop's cap: the larger of two of the four next multiples of $10 above the price."""
    steps = [p for p in PRICE_STEPS if p > price][:4]
    if len(steps) < 2:
        return NO_PRICE_CAP
    return max(rng.sample(steps, 2))


def make_goal(catalog: Catalog, split: str, index: int) -> Goal:
    """Goal number `index` of `split` (categories cycle with the index, the rest is drawn)."""
    rng = random.Random(f"webshop-goal/{catalog.seed}/{split}/{index}")
    category = CATEGORIES[index % len(CATEGORIES)]
    types = [
        t for t in PRODUCT_TYPES
        if t.category == category and catalog.eligible_targets(split, t.name)
    ]
    ptype = rng.choice(types)
    target = rng.choice(catalog.eligible_targets(split, ptype.name))
    held = catalog.held_out[ptype.name]
    seen_attrs = [a for a in target.attributes if a not in held]
    if split == "eval_unseen":
        unseen = [a for a in target.attributes if a in held]
        extra = rng.randint(0, min(2, len(seen_attrs)))
        attrs = [rng.choice(unseen)] + rng.sample(seen_attrs, extra)
        rng.shuffle(attrs)
    else:
        attrs = rng.sample(seen_attrs, rng.randint(1, min(3, len(seen_attrs))))
    options = {g: rng.choice(values) for g, values in sorted(target.options.items())}
    cap = price_cap(rng, target.price)
    text = rng.choice(_INSTRUCTION_TEMPLATES).format(type=ptype.name, attrs=_join(attrs))
    if options:
        text += " with " + ", and ".join(f"{g}: {v}" for g, v in options.items())
    if cap < NO_PRICE_CAP:
        text += f", and price lower than {cap:.2f} dollars"
    return Goal(
        asin=target.asin,
        category=target.category,
        product_category=target.product_category,
        query=target.query,
        name=target.name,
        attributes=tuple(attrs),
        options=options,
        price_upper=cap,
        instruction=text,
    )


_WORD = re.compile(r"[a-z0-9]+(?:\.[0-9]+)?")


def words(text: str) -> list[str]:
    """Lower-case word tokens with a light plural folding (shoes -> shoe), shared by search and
    the reward's product-type match so that both see words the same way."""
    out = []
    for w in _WORD.findall(text.lower()):
        if len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
            w = w[:-1]
        out.append(w)
    return out
