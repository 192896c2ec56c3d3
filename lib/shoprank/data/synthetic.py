"""A small synthetic shop in the contract's format, for tests, demos and laptop runs.

The data is built to be learnable from text: items have titles made of brand, adjectives,
product noun and attribute; users prefer a few leaf categories, two brands and a price level,
and drift to a new category over the days; each session focuses on one category, so the next
item a user engages with is better predicted by the text of their previous items than by
popularity. A visit after another often shops for the previous focus's complements (a tent,
then a sleeping bag; a blender, then a water bottle): what the items' words do not say and only
the logs can teach. About 20% of sessions are searches whose clicks match the query text. Search
judgments are graded by the same attribute matching (3 exact, 2 same noun, 1 same
subcategory, 0 unrelated).

A fraction of deliberately bad rows is planted (and reported in the summary) so that the
validation and quarantine path always has something to count.

The users are one model, `Shoppers` (hidden tastes, drift, the choice model), which draws the
shop's history here and, in the simulation of shoprank.loop.simulate, reacts to what a live
endpoint shows them: `shop_model` rebuilds the shoppers behind a generated shop, `add_line`
brings new items (and a trend for them), `catalog_table` writes the grown catalog.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from shoprank.data.contract import POSITIVE_EVENTS
from shoprank.data.validate import check_events, split_quarantine

# The category tree, one leaf per two lines:
#   department > subcategory > leaf | title noun | short query noun | median price ($)
#       adjectives | attributes
_TREE = """
Kitchen > Drinkware > Water Bottles | Water Bottle | bottle | 22
    Insulated, Stainless Steel, BPA-Free, Leakproof, Collapsible, Glass | 500ml, 750ml, 1L, 1.5L
Kitchen > Drinkware > Travel Mugs | Travel Mug | mug | 20
    Insulated, Spill-Proof, Ceramic, Double-Wall, Vacuum | 12oz, 16oz, 20oz
Kitchen > Cookware > Frying Pans | Frying Pan | pan | 35
    Nonstick, Cast Iron, Ceramic, Stainless Steel, Induction-Ready | 8 inch, 10 inch, 12 inch
Kitchen > Cookware > Saucepans | Saucepan | saucepan | 40
    Nonstick, Stainless Steel, Copper, Tri-Ply | 1.5qt, 2qt, 3qt
Kitchen > Cookware > Dutch Ovens | Dutch Oven | dutch oven | 70
    Enameled, Cast Iron, Pre-Seasoned, Oven-Safe | 4qt, 5.5qt, 7qt
Kitchen > Small Appliances > Blenders | Blender | blender | 60
    High-Speed, Personal, Countertop, Quiet, Portable | 600W, 1000W, 1500W
Kitchen > Small Appliances > Coffee Makers | Coffee Maker | coffee maker | 55
    Programmable, Single-Serve, Drip, Thermal, Compact | 4-Cup, 10-Cup, 12-Cup
Kitchen > Small Appliances > Electric Kettles | Electric Kettle | kettle | 35
    Glass, Stainless Steel, Gooseneck, Cordless, Temperature-Control | 1L, 1.7L
Kitchen > Small Appliances > Toasters | Toaster | toaster | 40
    Wide-Slot, Retro, Stainless Steel, Digital, Compact | 2-Slice, 4-Slice
Kitchen > Cutlery > Chef Knives | Chef Knife | knife | 45
    German Steel, Japanese, Damascus, Forged, Ultra-Sharp | 6 inch, 8 inch, 10 inch
Kitchen > Cutlery > Knife Sets | Knife Block Set | knife set | 80
    Stainless Steel, Forged, Self-Sharpening, Ceramic | 6-Piece, 12-Piece, 15-Piece
Electronics > Audio > Headphones | Headphones | headphones | 90
    Wireless, Noise Cancelling, Over-Ear, Foldable, Studio | Bluetooth 5.3, 40h Battery, 60h Battery
Electronics > Audio > Earbuds | Earbuds | earbuds | 50
    True Wireless, Noise Cancelling, Waterproof, Sport, Bass-Boost | 30h Battery, 8h Playtime
Electronics > Audio > Bluetooth Speakers | Bluetooth Speaker | speaker | 45
    Portable, Waterproof, Rugged, Mini, Party | 10W, 20W, 40W
Electronics > Computer Accessories > Keyboards | Keyboard | keyboard | 60
    Mechanical, Wireless, Backlit, Ergonomic, Compact | Full-Size, TKL, 60%
Electronics > Computer Accessories > Mice | Mouse | mouse | 25
    Wireless, Ergonomic, Gaming, Silent, Vertical | 1600 DPI, 4000 DPI, 16000 DPI
Electronics > Computer Accessories > USB Hubs | USB Hub | usb hub | 25
    Aluminum, Powered, Slim, USB-C | 4-Port, 7-Port, 10-Port
Electronics > Computer Accessories > Webcams | Webcam | webcam | 50
    HD, Autofocus, Wide-Angle, Streaming | 1080p, 2K, 4K
Electronics > Phone Accessories > Phone Cases | Phone Case | case | 15
    Shockproof, Slim, Clear, Leather, Rugged | iPhone 15, Galaxy S24, Pixel 8
Electronics > Phone Accessories > Chargers | Wall Charger | charger | 22
    Fast, Dual-Port, GaN, Compact, Foldable | 20W, 45W, 65W
Electronics > Phone Accessories > Power Banks | Power Bank | power bank | 30
    Portable, Slim, Magnetic, Solar, Fast-Charging | 5000mAh, 10000mAh, 20000mAh
Sports & Outdoors > Fitness > Yoga Mats | Yoga Mat | yoga mat | 30
    Non-Slip, Extra Thick, Eco-Friendly, Foldable, Cork | 4mm, 6mm, 8mm
Sports & Outdoors > Fitness > Dumbbells | Dumbbell Set | dumbbells | 60
    Adjustable, Neoprene, Hex, Cast Iron, Rubber-Coated | 5lb, 10lb, 20lb, 50lb
Sports & Outdoors > Fitness > Resistance Bands | Resistance Band Set | resistance bands | 20
    Latex, Fabric, Heavy-Duty, Loop | 5-Pack, 11-Piece
Sports & Outdoors > Camping > Tents | Camping Tent | tent | 120
    Waterproof, Lightweight, Instant, Backpacking, Family | 2-Person, 4-Person, 6-Person
Sports & Outdoors > Camping > Sleeping Bags | Sleeping Bag | sleeping bag | 60
    Down, Lightweight, Mummy, Compact, Cold-Weather | 20F, 32F, 40F
Sports & Outdoors > Camping > Headlamps | Headlamp | headlamp | 25
    Rechargeable, LED, Waterproof, Ultra-Bright | 300 Lumen, 600 Lumen, 1000 Lumen
Sports & Outdoors > Camping > Hiking Backpacks | Hiking Backpack | backpack | 70
    Lightweight, Waterproof, Ventilated, Ultralight | 20L, 35L, 50L
Sports & Outdoors > Cycling > Bike Helmets | Bike Helmet | helmet | 55
    Lightweight, MIPS, Ventilated, Aero | Small, Medium, Large
Sports & Outdoors > Cycling > Bike Lights | Bike Light Set | bike light | 25
    USB Rechargeable, Waterproof, Ultra-Bright, Smart | 400 Lumen, 800 Lumen
Home > Bedding > Pillows | Bed Pillow | pillow | 35
    Memory Foam, Cooling, Down Alternative, Hypoallergenic, Adjustable | Standard, Queen, King
Home > Bedding > Sheet Sets | Sheet Set | sheets | 45
    Cotton, Bamboo, Microfiber, Linen, Deep Pocket | Twin, Queen, King
Home > Bedding > Duvet Covers | Duvet Cover | duvet cover | 50
    Cotton, Linen, Washed, Reversible | Full, Queen, King
Home > Lighting > Desk Lamps | Desk Lamp | desk lamp | 35
    LED, Dimmable, Adjustable, Wireless-Charging, Clamp | 5W, 10W, 12W
Home > Lighting > LED Strip Lights | LED Strip Lights | led strip | 25
    RGB, Smart, Wi-Fi, Music-Sync | 16ft, 32ft, 50ft
Home > Storage > Storage Bins | Storage Bin Set | storage bins | 30
    Fabric, Collapsible, Stackable, Clear Plastic, Lidded | 3-Pack, 6-Pack
Home > Storage > Shoe Racks | Shoe Rack | shoe rack | 35
    Bamboo, Metal, Stackable, Over-the-Door | 3-Tier, 5-Tier, 10-Tier
Beauty > Skin Care > Moisturizers | Face Moisturizer | moisturizer | 22
    Hydrating, Oil-Free, Fragrance-Free, Night, Gel | 1.7oz, 2.5oz
Beauty > Skin Care > Sunscreens | Sunscreen | sunscreen | 16
    Mineral, Water-Resistant, Lightweight, Reef-Safe, Tinted | SPF 30, SPF 50
Beauty > Skin Care > Face Serums | Face Serum | serum | 25
    Vitamin C, Hyaluronic Acid, Retinol, Niacinamide | 1oz, 2oz
Beauty > Hair Care > Shampoos | Shampoo | shampoo | 14
    Sulfate-Free, Moisturizing, Volumizing, Anti-Dandruff, Clarifying | 12oz, 16oz, 33oz
Beauty > Hair Care > Hair Dryers | Hair Dryer | hair dryer | 50
    Ionic, Compact, Professional, Travel, Ceramic | 1200W, 1875W
Pet Supplies > Dogs > Dog Beds | Dog Bed | dog bed | 45
    Orthopedic, Washable, Calming, Waterproof, Memory Foam | Small, Medium, Large, XL
Pet Supplies > Dogs > Dog Leashes | Dog Leash | leash | 18
    Retractable, Reflective, Nylon, Leather, Hands-Free | 4ft, 6ft, 16ft
Pet Supplies > Dogs > Dog Toys | Dog Toy | dog toy | 12
    Squeaky, Chew, Plush, Durable, Interactive | Single, 3-Pack, 5-Pack
Pet Supplies > Cats > Cat Litter | Cat Litter | cat litter | 20
    Clumping, Unscented, Low-Dust, Natural, Lightweight | 10lb, 20lb, 40lb
Pet Supplies > Cats > Cat Trees | Cat Tree | cat tree | 70
    Multi-Level, Sisal, Modern, Compact | 34in, 54in, 72in
Office > Writing > Gel Pens | Gel Pen Set | gel pens | 12
    Retractable, Quick-Dry, Fine Point, Colored | 12-Pack, 24-Pack, 48-Pack
Office > Writing > Notebooks | Notebook | notebook | 12
    Dotted, Lined, Hardcover, Spiral, Leather | A5, B5, 8.5x11
Office > Desk > Desk Organizers | Desk Organizer | desk organizer | 22
    Bamboo, Mesh, Rotating, Drawer | 3-Tier, 5-Compartment
Office > Desk > Office Chairs | Office Chair | office chair | 160
    Ergonomic, Mesh, High-Back, Reclining, Lumbar-Support | 250lb, 300lb, 400lb
"""

# What shoppers buy next after a leaf: its complements, mostly across subcategories and
# departments, so that the text of what was bought does not name them (a tent's sleeping bag
# shares "Camping"; a blender's water bottle shares nothing). Learned from the logs or not at all.
_COMPLEMENTS = """
Water Bottles: Yoga Mats, Hiking Backpacks | Travel Mugs: Coffee Makers
Frying Pans: Chef Knives | Saucepans: Knife Sets | Dutch Ovens: Chef Knives
Blenders: Water Bottles | Coffee Makers: Travel Mugs | Electric Kettles: Travel Mugs
Toasters: Frying Pans | Chef Knives: Frying Pans | Knife Sets: Saucepans
Headphones: Power Banks | Earbuds: Chargers | Bluetooth Speakers: Power Banks
Keyboards: Desk Lamps | Mice: Desk Organizers | USB Hubs: Chargers | Webcams: Desk Lamps
Phone Cases: Chargers | Chargers: Earbuds | Power Banks: Headlamps
Yoga Mats: Water Bottles | Dumbbells: Water Bottles | Resistance Bands: Yoga Mats
Tents: Sleeping Bags, Headlamps | Sleeping Bags: Headlamps | Headlamps: Power Banks
Hiking Backpacks: Water Bottles | Bike Helmets: Bike Lights | Bike Lights: Power Banks
Pillows: Sheet Sets | Sheet Sets: Duvet Covers | Duvet Covers: Pillows
Desk Lamps: Office Chairs | LED Strip Lights: USB Hubs | Storage Bins: Shoe Racks
Shoe Racks: Storage Bins | Moisturizers: Sunscreens | Sunscreens: Water Bottles
Face Serums: Moisturizers | Shampoos: Hair Dryers | Hair Dryers: Shampoos
Dog Beds: Dog Toys | Dog Leashes: Dog Toys | Dog Toys: Dog Beds
Cat Litter: Cat Trees | Cat Trees: Cat Litter | Gel Pens: Notebooks | Notebooks: Gel Pens
Desk Organizers: Gel Pens | Office Chairs: Desk Lamps
"""
# A visit after one focused on a leaf shops for one of its complements this often.
COMPLEMENT_SHARE = 0.35


def _complements(leaves: list[_Leaf]) -> np.ndarray:
    """[leaves, 2] the complement leaves of each leaf (a single one repeated)."""
    index = {lf.path.split(" > ")[-1]: i for i, lf in enumerate(leaves)}
    table = np.arange(len(leaves))[:, None].repeat(2, axis=1)
    for entry in _COMPLEMENTS.replace("\n", " | ").split("|"):
        if entry.strip():
            leaf, others = entry.split(":")
            picks = [index[o.strip()] for o in others.split(",")]
            table[index[leaf.strip()]] = (picks * 2)[:2]
    return table


# Specialist brands per department (each carries a few leaves of its department).
_BRANDS = {
    "Kitchen": "Hydra, Kuchenwerk, Copperline, Brewly, Ferro, Oakhaven, Zestra, Santoku Co, "
    "Mornings, Vessel",
    "Electronics": "Voltix, Sonara, Keyforge, Pixelon, Ampere, Nimbus Audio, Cablecraft, Ohmic, "
    "Stellar Tech, Brightwave",
    "Sports & Outdoors": "Trailhead, Summit Gear, Ironpeak, Flexa, Northridge, Velocita, "
    "Campfire, Stride, Granite, Apex Trail",
    "Home": "Nordvik, Lumina, Dreamweave, Cozyline, Stackwell, Linenhouse, Hearth & Co, Brightnest",
    "Beauty": "Aurelia, Dermaclear, Sunveil, Silkara, Botanica, Glowhaus, Purely",
    "Pet Supplies": "Pawsome, Barkley, Whiskerly, Furhaven, Tailwag, Meowtopia",
    "Office": "Inkwell, Deskmate, Scriptura, Ergonomix, Paperleaf, Officio",
}
# Generalists appear in every category.
_GENERALISTS = ["Everyday Basics", "Primeline", "Homestead Goods"]

_USES = {
    "Kitchen": ["everyday use", "small kitchens", "busy mornings", "home cooks"],
    "Electronics": ["work and travel", "home offices", "gaming", "everyday use"],
    "Sports & Outdoors": ["home workouts", "weekend trips", "the trail", "training"],
    "Home": ["bedrooms", "small apartments", "everyday living", "guest rooms"],
    "Beauty": ["daily routines", "sensitive skin", "travel", "dry climates"],
    "Pet Supplies": ["small dogs", "large breeds", "indoor cats", "everyday play"],
    "Office": ["home offices", "students", "daily notes", "small desks"],
}
_COLORS = ["Black", "White", "Navy Blue", "Gray", "Sage Green", "Red", "Beige", "Teal"]
_EDITIONS = ["Pro", "Plus", "Max", "Lite", "Gen 2"]
_TIER_WORDS = ["budget-friendly", "everyday", "premium"]

_BASE = dt.datetime(2024, 3, 1)
_DAY_US = 86_400_000_000
_EVENTS = ("impression", "click", "add_to_cart", "purchase")
_BAD_EVENTS = ("view", "Click", "")
_BAD_KINDS = ("missing_user_id", "unknown_item", "bad_event", "duplicate", "bad_timestamp")


@dataclass(frozen=True)
class _Leaf:
    dept: int
    sub: int  # global subcategory index
    path: str
    noun: str
    short: str
    adjs: list[str]
    attrs: list[str]
    price: float
    dept_name: str


def _leaves() -> tuple[list[_Leaf], list[str]]:
    """Parse _TREE; departments and subcategories numbered in order of appearance."""
    lines = [line for line in _TREE.strip("\n").splitlines() if line.strip()]
    leaves: list[_Leaf] = []
    depts: list[str] = []
    subs: list[str] = []
    for head, body in zip(lines[::2], lines[1::2], strict=True):
        path, noun, short, price = (x.strip() for x in head.split("|"))
        adjs, attrs = ([x.strip() for x in part.split(",")] for part in body.split("|"))
        dept, sub, _ = path.split(" > ")
        if dept not in depts:
            depts.append(dept)
        if f"{dept} > {sub}" not in subs:
            subs.append(f"{dept} > {sub}")
        sub_index = subs.index(f"{dept} > {sub}")
        leaves.append(
            _Leaf(depts.index(dept), sub_index, path, noun, short, adjs, attrs, float(price), dept)
        )
    return leaves, depts


class _Sampler:
    """Draw items within groups (a leaf, a brand), weighted, vectorised over many draws.

    Items are sorted by group and each group's normalised cumulative weight is shifted by
    the group id, so one searchsorted of `group + u` serves every group at once.
    """

    def __init__(self, groups: np.ndarray, weights: np.ndarray, n_groups: int) -> None:
        self.order = np.lexsort((np.arange(len(groups)), groups))
        g, w = groups[self.order], weights[self.order]
        total = np.bincount(g, weights=w, minlength=n_groups)
        cum = np.cumsum(w)
        start = np.concatenate([[0.0], np.cumsum(total)])[:-1]
        self.key = g + (cum - start[g]) / total[g]  # only groups that have items appear

    def sample(self, groups: np.ndarray, u: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self.key, groups + u, side="left")
        return self.order[np.minimum(pos, len(self.order) - 1)]


def _distinct(title: str, stem: str, seen: set[str]) -> str:
    """Make a repeated title unique with a colour or an edition, so text tells items apart."""
    candidates = [title] + [f"{stem}, {c}" for c in _COLORS]
    candidates += [f"{stem} {e}, {c}" for e in _EDITIONS for c in [""] + _COLORS]
    for candidate in candidates:
        candidate = candidate.rstrip(", ")
        if candidate not in seen:
            seen.add(candidate)
            return candidate
    return title  # more than ~50 twins of one stem: leave the repeat


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _categorical(rng: np.random.Generator, weights: np.ndarray) -> np.ndarray:
    """One draw per row of a (n, k) weight matrix."""
    cum = np.cumsum(weights, axis=1)
    u = rng.random(len(weights)) * cum[:, -1]
    return np.minimum((cum < u[:, None]).sum(axis=1), weights.shape[1] - 1)


# ---------------------------------------------------------------------------------------------
# Catalog


def _make_items(rng: np.random.Generator, n_items: int, leaves: list[_Leaf], depts: list[str]):
    n_leaves = len(leaves)
    if n_items < n_leaves:
        raise ValueError(f"n_items must be at least {n_leaves} (one per leaf category)")
    leaf_pop = rng.gamma(2.0, 1.0, n_leaves)
    counts = 1 + rng.multinomial(n_items - n_leaves, leaf_pop / leaf_pop.sum())
    leaf = rng.permutation(np.repeat(np.arange(n_leaves), counts))

    # Brands: each department's specialists carry 3 or 4 of its leaves; generalists carry all.
    dept_brands = [_BRANDS[d].split(", ") for d in depts]
    brand_names = [b for names in dept_brands for b in names] + _GENERALISTS
    brand_dept = np.array([i for i, names in enumerate(dept_brands) for _ in names])
    generalists = np.arange(len(brand_names) - len(_GENERALISTS), len(brand_names))
    leaf_brands = []
    for lf in leaves:
        pool = np.flatnonzero(brand_dept == lf.dept)
        leaf_brands.append(
            rng.choice(pool, size=min(len(pool), 3 + rng.integers(2)), replace=False)
        )
    brand_tier = rng.normal(0.0, 0.3, len(brand_names))  # log price multiplier

    brand = np.empty(n_items, dtype=np.int64)
    adj1 = rng.integers(0, 1 << 30, n_items)
    adj2 = rng.integers(0, 1 << 30, n_items)
    attr = rng.integers(0, 1 << 30, n_items)
    u = rng.random(n_items)
    for li, lf in enumerate(leaves):
        idx = np.flatnonzero(leaf == li)
        specialists = leaf_brands[li]
        zipf = 1.0 / np.arange(1, len(specialists) + 1)
        pick = rng.choice(specialists, size=len(idx), p=zipf / zipf.sum())
        brand[idx] = np.where(u[idx] < 0.15, rng.choice(generalists, size=len(idx)), pick)
        n_adj = len(lf.adjs)
        adj1[idx] %= n_adj
        adj2[idx] = (adj1[idx] + 1 + adj2[idx] % (n_adj - 1)) % n_adj
        attr[idx] %= len(lf.attrs)
    has_adj2 = rng.random(n_items) < 0.5
    adj2 = np.where(has_adj2, adj2, -1)
    color = np.where(rng.random(n_items) < 0.4, rng.integers(0, len(_COLORS), n_items), -1)

    median = np.array([lf.price for lf in leaves])[leaf]
    log_price = np.log(median) + brand_tier[brand] + rng.normal(0.0, 0.3, n_items)
    price = np.maximum(np.floor(np.exp(log_price)) + 0.99, 0.99)
    quality = rng.normal(0.0, 1.0, n_items)
    in_stock = rng.random(n_items) < 0.9
    tier = np.digitize(brand_tier[brand], [-0.15, 0.15])
    template = rng.integers(0, 3, n_items)
    use = rng.integers(0, 4, n_items)

    titles, descriptions, seen = [], [], set()
    for i in range(n_items):  # 3k strings: text assembly, not row processing
        lf = leaves[leaf[i]]
        b = brand_names[brand[i]]
        a1 = lf.adjs[adj1[i]]
        a2 = lf.adjs[adj2[i]] if adj2[i] >= 0 else ""
        at = lf.attrs[attr[i]]
        words = [b, a1] + ([a2] if a2 else []) + [lf.noun, at]
        title = " ".join(words) + (f", {_COLORS[color[i]]}" if color[i] >= 0 else "")
        title = _distinct(title, " ".join(words), seen)
        purpose = _USES[lf.dept_name][use[i]]
        noun = lf.noun.lower()
        if template[i] == 0:
            desc = f"{a1} {noun} from {b}, {at}. Designed for {purpose}."
        elif template[i] == 1:
            quality_words = f"{a1.lower()} and {a2.lower()}" if a2 else a1.lower()
            desc = f"The {b} {noun} is {quality_words}. {at}, great for {purpose}."
        else:
            desc = f"A {_TIER_WORDS[tier[i]]} {noun} in {at}. Made for {purpose}."
        titles.append(title)
        descriptions.append(desc)

    return {
        "leaf": leaf,
        "brand": brand,
        "adj1": adj1,
        "adj2": adj2,
        "attr": attr,
        "price": price,
        "quality": quality,
        "in_stock": in_stock,
        "title": titles,
        "description": descriptions,
        "brand_names": brand_names,
        "leaf_pop": leaf_pop,
        "id": [f"P{i:05d}" for i in range(n_items)],
    }


# ---------------------------------------------------------------------------------------------
# Queries (shared by search sessions and judgments)


def _query_key(leaf: np.ndarray, qtype: np.ndarray, value: np.ndarray) -> np.ndarray:
    return (leaf * 4 + qtype) * 1000 + value


def _query_text(leaf: _Leaf, qtype: int, value: int, brand_names: list[str]) -> str:
    """qtype 0: noun; 1: adjective + noun; 2: brand + short noun; 3: noun + attribute."""
    noun = leaf.noun.lower()
    if qtype == 1:
        return f"{leaf.adjs[value].lower()} {noun}"
    if qtype == 2:
        return f"{brand_names[value].lower()} {leaf.short}"
    if qtype == 3:
        return f"{noun} {leaf.attrs[value].lower()}"
    return noun


def _queries_for(items: dict, target: np.ndarray, qtype: np.ndarray) -> np.ndarray:
    """The constraint value of a query built from a target item (0 for noun queries)."""
    value = np.zeros(len(target), dtype=np.int64)
    value = np.where(qtype == 1, items["adj1"][target], value)
    value = np.where(qtype == 2, items["brand"][target], value)
    return np.where(qtype == 3, items["attr"][target], value)


def _exact(items: dict, item: np.ndarray, leaf: np.ndarray, qtype: np.ndarray, value: np.ndarray):
    """Does the item match the query's noun (leaf) and its constraint?"""
    same_leaf = items["leaf"][item] == leaf
    ok = np.select(
        [qtype == 1, qtype == 2, qtype == 3],
        [
            (items["adj1"][item] == value) | (items["adj2"][item] == value),
            items["brand"][item] == value,
            items["attr"][item] == value,
        ],
        default=True,
    )
    return same_leaf & ok


# ---------------------------------------------------------------------------------------------
# Shoppers: the one user model, shared by the batch generator below and the live simulation
# (shoprank.loop.simulate), which shows each shopper what a served endpoint answered.

DAY_S = 86_400.0
DRIFT_SCALE_S = 64_800.0  # the drift ramp's scale: 10% to 90% of the way in about three days


class _LeafGroups:
    """Leaves by department and by subcategory, for "a related leaf" draws."""

    def __init__(self, leaves: list[_Leaf]):
        self.n = len(leaves)
        self.key = {
            "dept": np.array([lf.dept for lf in leaves]),
            "sub": np.array([lf.sub for lf in leaves]),
        }
        self.groups = {}
        for level, key in self.key.items():
            order = np.argsort(key, kind="stable")
            start = np.searchsorted(key[order], np.arange(key.max() + 1))
            self.groups[level] = (order, start, np.bincount(key))

    def related(self, rng: np.random.Generator, base: np.ndarray, level: str) -> np.ndarray:
        """A different leaf in the same department or subcategory (itself if it is alone)."""
        key = self.key[level]
        order, start, size = self.groups[level]
        g = key[base]
        where = np.empty(self.n, dtype=np.int64)  # a leaf's rank inside its group
        where[order] = np.arange(self.n) - start[key[order]]
        pos_in = where[base]
        shift = 1 + rng.integers(0, 1 << 30, len(base)) % np.maximum(size[g] - 1, 1)
        new = np.where(size[g] > 1, (pos_in + shift) % size[g], pos_in)
        return order[start[g] + new]


@dataclass(frozen=True)
class Trend:
    """A brand the market takes to: from `start_day` every shopper's utility for its items
    grows by `per_day` a day, up to `most` (a new line catching on)."""

    brand: int
    start_day: float
    per_day: float
    most: float


@dataclass
class Session:
    """One visit: who, when (seconds since the shop's first day), the leaf it focuses on, how
    far the user's drift has gone, and for a search the query (target item, type, value)."""

    user: int
    t: float
    focus: int
    ramp: float
    query: tuple[int, int, int] | None = None  # (target item, qtype, qvalue)


@dataclass
class Shoppers:
    """The synthetic shop's users: hidden tastes, their drift over time, and how they choose.

    Each user has three interest leaves (mostly in one department) with weights, a fourth leaf
    that takes over from the third around the user's `drift_t` (a sigmoid ramp, most of it
    within three days), two favourite brands, a preferred price level (log ratio to the leaf's
    median) and an activity level. A session focuses on one leaf drawn from the interests at
    its time (8% explore the whole shop), or after a previous visit, COMPLEMENT_SHARE of the
    time, on a complement of that visit's leaf (`follow`); a search session's query is built
    from an item of that leaf.
    Shown an item at a position, the user clicks with probability sigmoid(utility) x (1 +
    position)^-0.5 (x 0.4 when out of stock), the utility adding up leaf match, the current
    interests, favourite brand, price fit and quality (search: the query match instead of the
    interests); a click may go on to a cart and a purchase. `trends` add utility to a brand's
    items over time; an item before its `arrival` day is not available (never engaged with).
    `generate_shop` uses neither, so the shop's history is as it always was.

    Times are seconds since the shop's first day (day d starts at d * DAY_S).
    """

    items: dict
    leaves: list[_Leaf]
    interest: np.ndarray  # [users, 4] leaf ids: three interests, then the drift leaf
    weights: np.ndarray  # [users, 3] the interests' weights
    fav: np.ndarray  # [users, 2] favourite brand ids
    price: np.ndarray  # [users] preferred log(price / leaf median)
    drift_t: np.ndarray  # [users] when the fourth leaf takes over, seconds
    activity: np.ndarray  # [users] how often the user comes (sessions scale with it)
    arrival: np.ndarray | None = None  # [items] first day an item can be had; None: all
    trends: list[Trend] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.complements = _complements(self.leaves)
        self.pop = np.exp(0.8 * self.items["quality"])
        self.by_leaf = _Sampler(self.items["leaf"], self.pop, len(self.leaves))
        self.p_leaf = self.items["leaf_pop"] / self.items["leaf_pop"].sum()
        self.median = np.array([lf.price for lf in self.leaves])

    @classmethod
    def draw(
        cls,
        rng: np.random.Generator,
        items: dict,
        leaves: list[_Leaf],
        n_users: int,
        days: int,
        groups: _LeafGroups | None = None,
    ) -> Shoppers:
        """Draw `n_users` users for a shop of `days` days (their drift falls in 25-85% of it)."""
        n_leaves = len(leaves)
        groups = groups or _LeafGroups(leaves)
        pop = np.exp(0.8 * items["quality"])
        by_leaf = _Sampler(items["leaf"], pop, n_leaves)
        p_leaf = items["leaf_pop"] / items["leaf_pop"].sum()
        leaf1 = rng.choice(n_leaves, size=n_users, p=p_leaf)
        leaf2 = np.where(
            rng.random(n_users) < 0.7,
            groups.related(rng, leaf1, "dept"),
            rng.choice(n_leaves, size=n_users, p=p_leaf),
        )
        leaf3 = np.where(
            rng.random(n_users) < 0.5,
            groups.related(rng, leaf1, "sub"),
            rng.choice(n_leaves, size=n_users, p=p_leaf),
        )
        leaf4 = np.where(
            rng.random(n_users) < 0.6,
            groups.related(rng, leaf3, "sub"),
            groups.related(rng, leaf2, "dept"),
        )
        interest = np.stack([leaf1, leaf2, leaf3, leaf4], axis=1)
        weights = rng.gamma(np.array([2.0, 1.5, 1.2]), size=(n_users, 3))
        weights /= weights.sum(axis=1, keepdims=True)
        fav = np.stack(
            [
                items["brand"][by_leaf.sample(leaf1, rng.random(n_users))],
                items["brand"][by_leaf.sample(leaf2, rng.random(n_users))],
            ],
            axis=1,
        )
        price = rng.normal(0.0, 0.35, n_users)
        drift_t = rng.uniform(0.25, 0.85, n_users) * (days * DAY_S)
        activity = rng.lognormal(0.0, 0.5, n_users)
        return cls(items, leaves, interest, weights, fav, price, drift_t, activity)

    @property
    def n_users(self) -> int:
        return len(self.interest)

    def ramp(self, user: np.ndarray, t: np.ndarray) -> np.ndarray:
        """How far each user's drift has gone at time t: 0 before, 1 after."""
        return _sigmoid((t - self.drift_t[user]) / DRIFT_SCALE_S)

    def interest_weights(self, user: np.ndarray, ramp: np.ndarray) -> np.ndarray:
        """[n, 4] weights of the four interest leaves: the third fades as the fourth grows."""
        w = self.weights[user]
        return np.stack([w[:, 0], w[:, 1], w[:, 2] * (1 - ramp), 1.5 * w[:, 2] * ramp], axis=1)

    def focus(self, rng: np.random.Generator, user: np.ndarray, t: np.ndarray):
        """Each session's focus leaf (8% explore the shop), its drift ramp and interest weights."""
        ramp = self.ramp(user, t)
        focus_w = self.interest_weights(user, ramp)
        focus = self.interest[user, _categorical(rng, focus_w)]
        explore = rng.random(len(user)) < 0.08
        n_leaves = len(self.leaves)
        focus = np.where(explore, rng.choice(n_leaves, size=len(user), p=self.p_leaf), focus)
        return focus, ramp, focus_w

    def follow(self, rng: np.random.Generator, focus: np.ndarray, after: np.ndarray):
        """Complementary shopping: a visit after one focused on leaf `after` (-1: the user's
        first) turns to one of that leaf's complements, COMPLEMENT_SHARE of the time."""
        turn = (after >= 0) & (rng.random(len(focus)) < COMPLEMENT_SHARE)
        pick = self.complements[np.maximum(after, 0), rng.integers(0, 2, len(focus))]
        return np.where(turn, pick, focus)

    def queries(self, rng: np.random.Generator, focus: np.ndarray):
        """A search per session: a target item of the focus leaf and a query built from it,
        (target, qtype, qvalue) (qtype 0 noun, 1 adjective, 2 brand, 3 attribute)."""
        target = self.by_leaf.sample(focus, rng.random(len(focus)))
        qtype = rng.choice(4, size=len(focus), p=[0.25, 0.3, 0.2, 0.25])
        return target, qtype, _queries_for(self.items, target, qtype)

    def utility(self, user, item, ramp, focus, t=None, search=None, exact=None):
        """(utility, favourite brand?, price fit, leaf match?) of each (user, item) shown in a
        session with that focus and ramp; `search` marks search sessions, `exact` the items
        that match their query."""
        items = self.items
        i_leaf = items["leaf"][item]
        leaf_match = i_leaf == focus
        cur = self.interest[user]
        likes = (
            (i_leaf == cur[:, 0])
            | (i_leaf == cur[:, 1])
            | ((i_leaf == cur[:, 2]) & (ramp < 0.5))
            | ((i_leaf == cur[:, 3]) & (ramp >= 0.5))
        )
        fav_brand = (items["brand"][item] == self.fav[user, 0]) | (
            items["brand"][item] == self.fav[user, 1]
        )
        price_fit = -np.abs(np.log(items["price"][item] / self.median[i_leaf]) - self.price[user])
        quality = items["quality"][item]
        if search is None:
            search = exact = np.zeros(len(item), dtype=bool)
        util = np.where(
            search,
            -2.0 + 2.8 * exact + 0.8 * leaf_match - 1.5 * ~leaf_match + 0.6 * fav_brand,
            -2.2 + 1.5 * leaf_match + 0.7 * likes + 1.0 * fav_brand,
        )
        util = util + 1.0 * price_fit + 0.4 * quality
        if self.trends and t is not None:
            util = util + self.trend_bonus(item, t)
        return util, fav_brand, price_fit, leaf_match

    def trend_bonus(self, item: np.ndarray, t) -> np.ndarray:
        day = np.asarray(t, dtype=np.float64) / DAY_S
        bonus = np.zeros(len(item))
        for trend in self.trends:
            grown = np.clip((day - trend.start_day) * trend.per_day, 0.0, trend.most)
            bonus = bonus + np.where(self.items["brand"][item] == trend.brand, grown, 0.0)
        return bonus

    def available(self, item: np.ndarray, t) -> np.ndarray:
        if self.arrival is None:
            return np.ones(len(item), dtype=bool)
        return self.arrival[item] <= np.asarray(t) / DAY_S

    def click_probability(self, user, item, position, ramp, focus, t=None, search=None, exact=None):
        """P(click) of each item at its position; also what the funnel after it needs."""
        util, fav_brand, price_fit, leaf_match = self.utility(
            user, item, ramp, focus, t, search, exact
        )
        stock = self.items["in_stock"][item]
        p_click = _sigmoid(util) * (1.0 + position) ** -0.5 * np.where(stock, 1.0, 0.4)
        if self.arrival is not None and t is not None:
            p_click = np.where(self.available(item, t), p_click, 0.0)
        return p_click, stock, fav_brand, price_fit, leaf_match

    def outcomes(
        self, rng, user, item, position, ramp, focus, t=None, search=None, exact=None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(click, cart, purchase) booleans for items shown at positions, vectorised over many
        sessions' impressions (each row names its user, focus and ramp)."""
        p_click, stock, fav_brand, price_fit, leaf_match = self.click_probability(
            user, item, position, ramp, focus, t, search, exact
        )
        click = rng.random(len(item)) < p_click
        matched = leaf_match if exact is None else leaf_match | exact
        p_cart = _sigmoid(-0.9 + 0.8 * fav_brand + 1.0 * price_fit + 0.5 * matched)
        cart = click & stock & (rng.random(len(item)) < p_cart)
        buy = cart & (rng.random(len(item)) < _sigmoid(0.2 + 0.6 * price_fit + 0.4 * fav_brand))
        return click, cart, buy

    # -- one session at a time (the live simulation) -----------------------------------------

    def start_session(
        self,
        rng: np.random.Generator,
        user: int,
        t: float,
        search: bool = False,
        after: int | None = None,
    ) -> Session:
        """A visit by `user` at time t, drawn as the batch generator draws sessions; `after`
        is the focus of the user's previous visit (None: the first)."""
        focus, ramp, _ = self.focus(rng, np.array([user]), np.array([t], dtype=np.float64))
        focus = self.follow(rng, focus, np.array([-1 if after is None else after]))
        query = None
        if search:
            target, qtype, qvalue = self.queries(rng, focus)
            query = (int(target[0]), int(qtype[0]), int(qvalue[0]))
        return Session(user, float(t), int(focus[0]), float(ramp[0]), query)

    def query_text(self, session: Session) -> str:
        target, qtype, qvalue = session.query
        leaf = self.leaves[self.items["leaf"][target]]
        return _query_text(leaf, qtype, qvalue, self.items["brand_names"])

    def _session_arrays(self, session: Session, item: np.ndarray):
        n = len(item)
        user = np.full(n, session.user)
        ramp, focus = np.full(n, session.ramp), np.full(n, session.focus)
        search = exact = None
        if session.query is not None:
            target, qtype, qvalue = session.query
            leaf = np.full(n, self.items["leaf"][target])
            search = np.ones(n, dtype=bool)
            exact = _exact(self.items, item, leaf, np.full(n, qtype), np.full(n, qvalue))
        return user, ramp, focus, search, exact

    def relevance(self, session: Session, item: np.ndarray) -> np.ndarray:
        """What each item is worth to this session: P(click) at the top position. The gains of
        the simulation's NDCG (its ideal: the session's best items in the whole catalog)."""
        item = np.asarray(item, dtype=np.int64)
        user, ramp, focus, search, exact = self._session_arrays(session, item)
        zero = np.zeros(len(item))
        return self.click_probability(user, item, zero, ramp, focus, session.t, search, exact)[0]

    def react(self, session: Session, shown: np.ndarray, rng: np.random.Generator):
        """(click, cart, purchase) for the items shown to this session, top first."""
        shown = np.asarray(shown, dtype=np.int64)
        user, ramp, focus, search, exact = self._session_arrays(session, shown)
        position = np.arange(len(shown))
        return self.outcomes(rng, user, shown, position, ramp, focus, session.t, search, exact)


def _simulate(rng: np.random.Generator, items: dict, leaves: list[_Leaf], n_users: int, days: int):
    """The shop's history: every session of `days` days, what the shop showed (its own
    ranking: mostly the session's focus leaf, noisily ordered) and what the shoppers did."""
    n_items = len(items["leaf"])
    groups = _LeafGroups(leaves)
    shoppers = Shoppers.draw(rng, items, leaves, n_users, days, groups)
    pop, by_leaf = shoppers.pop, shoppers.by_leaf
    by_brand = _Sampler(items["brand"], pop, len(items["brand_names"]))
    interest, fav = shoppers.interest, shoppers.fav
    n_sessions = 1 + rng.poisson(0.6 * days * shoppers.activity / np.exp(0.125))

    # Sessions: a start time (evening-heavy, never after 22:59 so a session stays in its day),
    # a focus leaf drawn from the user's interests at that time, a device, search or browse.
    user = np.repeat(np.arange(n_users), n_sessions)
    n_s = len(user)
    hour_w = np.array([1, 1, 1, 1, 1, 1, 2, 3, 4, 4, 4, 5, 6, 5, 4, 4, 5, 6, 8, 9, 9, 8, 6])
    hour = rng.choice(len(hour_w), size=n_s, p=hour_w / hour_w.sum())
    start = rng.integers(0, days, n_s) * DAY_S + hour * 3600.0 + rng.random(n_s) * 3600.0
    order = np.lexsort((start, user))
    user, start = user[order], start[order]
    focus, ramp, focus_w = shoppers.focus(rng, user, start)
    # Each user's visits in turn: the k-th follows the (k-1)-th's focus with its complements.
    nth = np.arange(n_s) - np.searchsorted(user, user)
    for k in range(1, int(nth.max()) + 1 if n_s else 0):
        idx = np.flatnonzero(nth == k)
        focus[idx] = shoppers.follow(rng, focus[idx], focus[idx - 1])
    is_search = rng.random(n_s) < 0.2
    device = rng.choice(3, size=n_s, p=[0.55, 0.35, 0.10])

    # Search sessions: a target item in the focus leaf, and a query built from it.
    target, qtype, qvalue = shoppers.queries(rng, focus)

    # Impression slots: 4..8 per session, drawn from the focus leaf, the user's other
    # interests, favourite brands or the whole catalog (browse); mostly the query's leaf,
    # its siblings and the target item (search).
    k = rng.integers(4, 9, n_s)
    sess = np.repeat(np.arange(n_s), k)
    n_slots = len(sess)
    su = user[sess]
    r = rng.random(n_slots)
    other_leaf = interest[su, _categorical(rng, focus_w[sess])]
    sibling = groups.related(rng, focus[sess], "sub")
    u = rng.random(n_slots)
    from_focus = by_leaf.sample(focus[sess], u)
    from_other = by_leaf.sample(other_leaf, u)
    from_brand = by_brand.sample(fav[su, rng.integers(0, 2, n_slots)], u)
    from_sibling = by_leaf.sample(sibling, u)
    from_all = rng.choice(n_items, size=n_slots, p=pop / pop.sum())
    browse_item = np.select(
        [r < 0.5, r < 0.65, r < 0.8], [from_focus, from_other, from_brand], from_all
    )
    search_item = np.select([r < 0.75, r < 0.88], [from_focus, from_sibling], from_all)
    first_slot = np.r_[True, sess[1:] != sess[:-1]]
    search_item = np.where(first_slot, target[sess], search_item)
    item = np.where(is_search[sess], search_item, browse_item)

    # One impression per (session, item); display order by a noisy relevance score.
    _, keep = np.unique(sess * n_items + item, return_index=True)
    keep.sort()
    sess, item, su = sess[keep], item[keep], su[keep]
    i_leaf = items["leaf"][item]
    srch = is_search[sess]
    exact = srch & _exact(items, item, items["leaf"][target[sess]], qtype[sess], qvalue[sess])
    leaf_match = i_leaf == focus[sess]
    gumbel = -np.log(-np.log(rng.random(len(item))))
    show_score = np.where(srch, 1.5 * exact + 1.0 * leaf_match, 0.6 * leaf_match)
    show_score = show_score + 0.3 * items["quality"][item] + gumbel
    order = np.lexsort((-show_score, sess))
    sess, item, su = sess[order], item[order], su[order]
    srch, exact = srch[order], exact[order]
    bounds = np.r_[0, np.flatnonzero(sess[1:] != sess[:-1]) + 1]
    position = np.arange(len(sess)) - np.repeat(bounds, np.diff(np.r_[bounds, len(sess)]))

    # What the shoppers did: clicks by preference and position, then the cart / purchase funnel.
    click, cart, buy = shoppers.outcomes(
        rng, su, item, position, ramp[sess], focus[sess], search=srch, exact=exact
    )

    # Rows: every impression, then one row per click / cart / purchase at later times.
    t_imp = start[sess] + 0.01 * position
    t_click = start[sess] + 4.0 + 6.0 * position + 4.0 * rng.random(len(item))
    t_cart = t_click + 10.0 + 110.0 * rng.random(len(item))
    t_buy = t_cart + 60.0 + 540.0 * rng.random(len(item))
    parts = [
        (np.ones_like(click), t_imp, 0),
        (click, t_click, 1),
        (cart, t_cart, 2),
        (buy, t_buy, 3),
    ]
    rows = {
        "row_sess": np.concatenate([sess[m] for m, _, _ in parts]),
        "item": np.concatenate([item[m] for m, _, _ in parts]),
        "position": np.concatenate([position[m] for m, _, _ in parts]),
        "event": np.concatenate([np.full(m.sum(), e) for m, _, e in parts]),
        "ts_us": np.concatenate([(t[m] * 1e6).astype(np.int64) for m, t, _ in parts]),
    }
    rows["user"] = user[rows["row_sess"]]
    sessions = {
        "user": user,
        "is_search": is_search,
        "qtype": qtype,
        "qvalue": qvalue,
        "qleaf": items["leaf"][target],
        "device": device,
        "focus": focus,
    }
    return rows, sessions


# ---------------------------------------------------------------------------------------------
# Judgments


def _make_judgments(rng: np.random.Generator, items: dict, leaves: list[_Leaf], n_queries: int):
    """~n_queries distinct queries, each with 20..30 items graded 0..3."""
    n_items = len(items["leaf"])
    leaf_sub = np.array([lf.sub for lf in leaves])
    pop = np.exp(0.8 * items["quality"])
    sampler = _Sampler(items["leaf"], pop, len(leaves))
    p_leaf = items["leaf_pop"] / items["leaf_pop"].sum()
    m = 4 * n_queries
    target = sampler.sample(rng.choice(len(leaves), size=m, p=p_leaf), rng.random(m))
    qtype = rng.choice(4, size=m, p=[0.15, 0.35, 0.25, 0.25])
    qvalue = _queries_for(items, target, qtype)
    qleaf = items["leaf"][target]
    _, first = np.unique(_query_key(qleaf, qtype, qvalue), return_index=True)
    chosen = np.sort(first)[:n_queries]

    all_items = np.arange(n_items)
    cols: dict[str, list] = {"query_id": [], "query": [], "item_id": [], "label": []}
    for j, q in enumerate(chosen):  # ~200 queries, each vectorised over the catalog
        lf, qt, qv = qleaf[q], qtype[q], qvalue[q]
        exact = _exact(
            items, all_items, np.full(n_items, lf), np.full(n_items, qt), np.full(n_items, qv)
        )
        same_leaf = items["leaf"] == lf
        same_sub = leaf_sub[items["leaf"]] == leaf_sub[lf]
        grade = np.select([exact, same_leaf, same_sub], [3, 2, 1], 0)
        quota = {
            3: 6 + rng.integers(0, 4),
            2: 6 + rng.integers(0, 4),
            1: 4 + rng.integers(0, 4),
            0: 4 + rng.integers(0, 3),
        }
        picked = []
        for g, n in quota.items():
            pool = np.flatnonzero(grade == g)
            picked.append(rng.choice(pool, size=min(n, len(pool)), replace=False))
        picked = rng.permutation(np.concatenate(picked))
        text = _query_text(leaves[lf], int(qt), int(qv), items["brand_names"])
        cols["query_id"] += [f"q{j:04d}"] * len(picked)
        cols["query"] += [text] * len(picked)
        cols["item_id"] += [items["id"][i] for i in picked]
        cols["label"] += grade[picked].astype(float).tolist()
    schema = pa.schema(
        [
            ("query_id", pa.string()),
            ("query", pa.string()),
            ("item_id", pa.string()),
            ("label", pa.float64()),
        ]
    )
    return pa.table(cols, schema=schema), len(chosen)


# ---------------------------------------------------------------------------------------------
# Tables and planted bad rows


def _catalog_table(rng: np.random.Generator, items: dict, leaves: list[_Leaf], bad_fraction: float):
    n = len(items["leaf"])
    table = pa.table(
        {
            "item_id": pa.array(items["id"], pa.string()),
            "title": pa.array(items["title"], pa.string()),
            "description": pa.array(items["description"], pa.string()),
            "brand": pa.array(items["brand_names"], pa.string()).take(pa.array(items["brand"])),
            "category": pa.array([lf.path for lf in leaves], pa.string()).take(
                pa.array(items["leaf"])
            ),
            "price": pa.array(items["price"], pa.float64()),
            "in_stock": pa.array(items["in_stock"], pa.bool_()),
        }
    )
    n_bad = int(round(n * bad_fraction / 2))
    if n_bad == 0:
        return table, {}
    # Empty titles on new ids (so no event depends on them), then repeats of existing ids.
    blank = table.take(pa.array(rng.choice(n, n_bad, replace=False)))
    blank = blank.set_column(0, "item_id", pa.array([f"PX{i:04d}" for i in range(n_bad)]))
    blank = blank.set_column(1, "title", pa.array(["", "  "] * (n_bad // 2) + [""] * (n_bad % 2)))
    dup = table.take(pa.array(rng.choice(n, n_bad, replace=False)))
    dup = dup.set_column(5, "price", pc.add(dup.column("price"), 1.0))
    planted = {"empty_title": n_bad, "duplicate_item_id": n_bad}
    return pa.concat_tables([table, blank, dup]), planted


def _plant_events(rng: np.random.Generator, rows: dict, n_items: int, bad_fraction: float):
    """Append corrupted copies of random rows, one defect each; return masks for nulls."""
    n = len(rows["item"])
    n_bad = int(round(n * bad_fraction))
    null_user = np.zeros(n, bool)
    null_ts = np.zeros(n, bool)
    planted: dict[str, int] = {}
    if n_bad == 0:
        return rows, null_user, null_ts, planted
    src = rng.choice(n, n_bad, replace=False)
    kind = np.arange(n_bad) % len(_BAD_KINDS)
    bad = {k: v[src].copy() for k, v in rows.items()}
    b_null_user = kind == 0
    b_empty_user = b_null_user & (np.arange(n_bad) % 2 == 1)  # half null, half ""
    bad["user"] = np.where(b_empty_user, -1, bad["user"])
    b_unknown = kind == 1
    bad["item"] = np.where(b_unknown, n_items + np.arange(n_bad), bad["item"])
    b_event = kind == 2
    bad["event"] = np.where(b_event, 4 + np.arange(n_bad) % len(_BAD_EVENTS), bad["event"])
    b_null_ts = kind == 4
    for k, code in enumerate(_BAD_KINDS):
        planted[code] = int((kind == k).sum())
    out = {k: np.concatenate([rows[k], bad[k]]) for k in rows}
    null_user = np.concatenate([null_user, b_null_user & ~b_empty_user])
    null_ts = np.concatenate([null_ts, b_null_ts])
    return out, null_user, null_ts, planted


def _events_table(
    rows: dict,
    sessions: dict,
    items: dict,
    leaves: list[_Leaf],
    n_users: int,
    null_user: np.ndarray,
    null_ts: np.ndarray,
) -> pa.Table:
    n_items = len(items["leaf"])
    n_extra = int(rows["item"].max()) + 1 - n_items if len(rows["item"]) else 0
    user_names = pa.array([f"U{i:05d}" for i in range(n_users)] + [""])
    item_names = pa.array(items["id"] + [f"GONE{i:05d}" for i in range(max(n_extra, 0))])
    events = pa.array(list(_EVENTS) + list(_BAD_EVENTS))
    # Query text per distinct (leaf, type, value) of the search sessions.
    search = np.flatnonzero(sessions["is_search"])
    keys = _query_key(
        sessions["qleaf"][search], sessions["qtype"][search], sessions["qvalue"][search]
    )
    uniq, first, inv = np.unique(keys, return_index=True, return_inverse=True)
    texts = [
        _query_text(
            leaves[sessions["qleaf"][search[f]]],
            int(sessions["qtype"][search[f]]),
            int(sessions["qvalue"][search[f]]),
            items["brand_names"],
        )
        for f in first
    ]
    q_of_session = np.full(len(sessions["user"]), -1)
    q_of_session[search] = inv
    q = q_of_session[rows["row_sess"]]
    n_s = len(sessions["user"])
    session_names = pa.array([f"S{i:06d}" for i in range(n_s)])
    user_idx = np.where(rows["user"] < 0, n_users, rows["user"])
    base_us = int(_BASE.replace(tzinfo=dt.UTC).timestamp() * 1e6)
    return pa.table(
        {
            "user_id": user_names.take(pa.array(user_idx, mask=null_user)),
            "item_id": item_names.take(pa.array(rows["item"])),
            "ts": pa.array(base_us + rows["ts_us"], pa.int64(), mask=null_ts).cast(
                pa.timestamp("us")
            ),
            "event": events.take(pa.array(rows["event"])),
            "query": pa.array(texts, pa.string()).take(pa.array(np.maximum(q, 0), mask=q < 0)),
            "session_id": session_names.take(pa.array(rows["row_sess"])),
            "position": pa.array(rows["position"], pa.int64()),
            "device": pa.array(["mobile", "desktop", "app"]).take(
                pa.array(sessions["device"][rows["row_sess"]])
            ),
        }
    )


def _write_events(events: pa.Table, day: np.ndarray, out: Path) -> list[str]:
    partitions = []
    for d in np.unique(day):
        name = f"dt={(_BASE + dt.timedelta(days=int(d))).date().isoformat()}"
        part = out / "events" / name
        part.mkdir(parents=True, exist_ok=True)
        pq.write_table(events.filter(pa.array(day == d)), part / "part-0.parquet")
        partitions.append(name)
    return partitions


def generate_shop(
    out_dir: str | Path,
    n_items: int = 3000,
    n_users: int = 2000,
    days: int = 14,
    seed: int = 0,
    bad_fraction: float = 0.01,
) -> dict:
    """Write catalog.parquet, events/dt=YYYY-MM-DD/part-0.parquet and judgments.parquet.

    Deterministic for a seed; the catalog depends only on (n_items, seed). Returns a summary
    with row counts and the number of planted bad rows per validation reason.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    leaves, depts = _leaves()
    s_items, s_users, s_judg, s_bad_cat, s_bad_ev = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(5)
    )
    items = _make_items(s_items, n_items, leaves, depts)
    rows, sessions = _simulate(s_users, items, leaves, n_users, days)
    judgments, n_queries = _make_judgments(s_judg, items, leaves, n_queries=200)
    catalog, planted_catalog = _catalog_table(s_bad_cat, items, leaves, bad_fraction)

    clean_rows = len(rows["item"])
    by_type = np.bincount(rows["event"], minlength=4)
    rows, null_user, null_ts, planted_events = _plant_events(s_bad_ev, rows, n_items, bad_fraction)
    order = np.argsort(rows["ts_us"], kind="stable")  # copies sort right after their source
    rows = {k: v[order] for k, v in rows.items()}
    null_user, null_ts = null_user[order], null_ts[order]
    events = _events_table(rows, sessions, items, leaves, n_users, null_user, null_ts)

    pq.write_table(catalog, out / "catalog.parquet")
    pq.write_table(judgments, out / "judgments.parquet")
    partitions = _write_events(events, rows["ts_us"] // _DAY_US, out)

    positives = int(by_type[1:].sum())
    return {
        "out_dir": str(out),
        "items": n_items,
        "catalog_rows": catalog.num_rows,
        "users": n_users,
        "sessions": len(sessions["user"]),
        "search_sessions": int(sessions["is_search"].sum()),
        "events": events.num_rows,
        "clean_events": clean_rows,
        "events_by_type": {e: int(c) for e, c in zip(_EVENTS, by_type, strict=True)},
        "positives_per_user": round(positives / n_users, 2),
        "partitions": len(partitions),
        "judgments": judgments.num_rows,
        "judged_queries": n_queries,
        "planted": {"catalog": planted_catalog, "events": planted_events},
        "seconds": round(time.perf_counter() - t0, 2),
    }


def shop_model(n_items: int = 3000, n_users: int = 2000, days: int = 14, seed: int = 0) -> Shoppers:
    """The catalog and the shoppers behind `generate_shop` with the same arguments (the same
    random draws): what a simulation needs to go on where the generated history stops."""
    leaves, depts = _leaves()
    s_items, s_users, *_ = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(5))
    items = _make_items(s_items, n_items, leaves, depts)
    return Shoppers.draw(s_users, items, leaves, n_users, days)


def add_line(
    shoppers: Shoppers,
    brand: str,
    n_items: int,
    arrival_day: float,
    trend: tuple[float, float] | None,
    seed: int = 0,
) -> Shoppers:
    """New items arriving: `n_items` of a new `brand` spread over the leaves (as many per leaf
    as the leaf's popularity gives), available from `arrival_day`; with `trend` = (per_day,
    most), shoppers take to the brand from that day on (Trend). Returns the shoppers over the
    grown catalog (`catalog_table` writes it); the old items keep their ids and rows."""
    rng = np.random.default_rng(seed)
    items, leaves = shoppers.items, shoppers.leaves
    p_leaf = items["leaf_pop"] / items["leaf_pop"].sum()
    leaf = np.sort(rng.choice(len(leaves), size=n_items, p=p_leaf))
    brand_id = len(items["brand_names"])
    new: dict = {k: [] for k in ("adj1", "adj2", "attr", "title", "description")}
    seen = set(items["title"])
    for li in leaf:
        lf = leaves[li]
        a1, at = rng.integers(len(lf.adjs)), rng.integers(len(lf.attrs))
        stem = f"{brand} {lf.adjs[a1]} {lf.noun} {lf.attrs[at]}"
        new["adj1"].append(a1)
        new["adj2"].append(-1)
        new["attr"].append(at)
        new["title"].append(_distinct(stem, stem, seen))
        purpose = _USES[lf.dept_name][rng.integers(4)]
        new["description"].append(
            f"{lf.adjs[a1]} {lf.noun.lower()} from {brand}, {lf.attrs[at]}. Designed for {purpose}."
        )
    median = np.array([lf.price for lf in leaves])[leaf]
    price = np.maximum(np.floor(median * np.exp(rng.normal(0.0, 0.2, n_items))) + 0.99, 0.99)
    first = len(items["leaf"])
    grown = {
        **items,
        "leaf": np.concatenate([items["leaf"], leaf]),
        "brand": np.concatenate([items["brand"], np.full(n_items, brand_id)]),
        "adj1": np.concatenate([items["adj1"], new["adj1"]]),
        "adj2": np.concatenate([items["adj2"], new["adj2"]]),
        "attr": np.concatenate([items["attr"], new["attr"]]),
        "price": np.concatenate([items["price"], price]),
        "quality": np.concatenate([items["quality"], rng.normal(0.0, 1.0, n_items)]),
        "in_stock": np.concatenate([items["in_stock"], np.ones(n_items, dtype=bool)]),
        "title": items["title"] + new["title"],
        "description": items["description"] + new["description"],
        "brand_names": [*items["brand_names"], brand],
        "id": items["id"] + [f"N{first + i:05d}" for i in range(n_items)],
    }
    old = shoppers.arrival if shoppers.arrival is not None else np.zeros(first)
    arrival = np.concatenate([old, np.full(n_items, float(arrival_day))])
    trends = list(shoppers.trends)
    if trend is not None:
        trends.append(Trend(brand_id, arrival_day, *trend))
    return replace(shoppers, items=grown, arrival=arrival, trends=trends)


def catalog_table(shoppers: Shoppers) -> pa.Table:
    """The shoppers' catalog in the contract (no planted bad rows)."""
    return _catalog_table(np.random.default_rng(0), shoppers.items, shoppers.leaves, 0.0)[0]


def held_out_kinds(shop_dir: str | Path, history_len: int = 10) -> dict[str, float]:
    """What each user's last browsing positive (the test item of leave-one-out) is, on a
    generated shop: shares of users whose item repeats one of their earlier positives (a cart
    after its click), and, with repeats dropped as `data.repeat_positives: first` drops them,
    whose leaf is in the newest `history_len` items' leaves, a complement of the newest one's,
    of an older one's, or none of these. Why text matching does well here, in numbers."""
    catalog = pq.read_table(Path(shop_dir) / "catalog.parquet", columns=["item_id", "category"])
    leaves, _ = _leaves()
    leaf_of_path = {lf.path: i for i, lf in enumerate(leaves)}
    leaf = dict(zip(catalog["item_id"].to_pylist(), catalog["category"].to_pylist(), strict=True))
    events = pads.dataset(Path(shop_dir) / "events", partitioning="hive").to_table()
    events, _ = split_quarantine(check_events(events, catalog["item_id"]))  # planted rows out
    keep = pc.and_(
        pc.is_in(events["event"], pa.array(POSITIVE_EVENTS)),
        pc.is_null(events["query"]),
    )
    events = events.filter(pc.fill_null(keep, False)).sort_by(
        [("user_id", "ascending"), ("ts", "ascending")]
    )
    complements = _complements(leaves)
    users, items = events["user_id"].to_pylist(), events["item_id"].to_pylist()
    by_user: dict[str, list[str]] = {}
    for user, item in zip(users, items, strict=True):
        if user and item in leaf:
            by_user.setdefault(user, []).append(item)
    counts = dict.fromkeys(
        ["repeat", "leaf in history", "complement of newest", "complement of older", "other"], 0
    )
    n = 0
    for seq in by_user.values():
        if len(seq) >= 3:
            counts["repeat"] += seq[-1] in seq[:-1]
        seq = list(dict.fromkeys(seq))  # first engagements (examples.first_engagements)
        if len(seq) < 3:
            continue
        n += 1
        hist = [leaf_of_path[leaf[i]] for i in seq[:-1][::-1][:history_len]]
        target = leaf_of_path[leaf[seq[-1]]]
        if target in hist:
            counts["leaf in history"] += 1
        elif target in complements[hist[0]]:
            counts["complement of newest"] += 1
        elif any(target in complements[h] for h in hist[1:]):
            counts["complement of older"] += 1
        else:
            counts["other"] += 1
    users_all = sum(len(s) >= 3 for s in by_user.values())
    shares = {k: round(v / max(n, 1), 3) for k, v in counts.items() if k != "repeat"}
    return {
        "users": n,
        "repeat (all positives kept)": round(counts["repeat"] / max(users_all, 1), 3),
        **shares,
    }
