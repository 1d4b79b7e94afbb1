"""WebShop (Yao et al., 2022) as an in-process text environment, after princeton-nlp/WebShop's text mode.

An agent gets a shopping instruction ("Find me ... with color: red, and price lower than 40.00 dollars"),
searches a store of real Amazon products, opens items, picks options and clicks Buy Now. The reward on
Buy Now is the original's: r_type * (matched attributes + matched options + price ok) / (attributes +
options + 1). A page is rendered twice: as the original's simple text mode (visible strings joined by " [SEP] ")
followed by one line listing the admissible actions, the compact prompt's observation; and as its text_rich mode
(buttons marked, the options already picked and products already opened marked as clicked), the Step's scene, which
the paper-style prompt shows as the authors' code does (it makes the env with observation_mode="text_rich").

Data: the official files in `data` (default: the bundled real 65-product slice in data/webshop/, see its
README). `items_shuffle*.json` holds the products, `items_ins_v2*.json` the attributes and the synthetic
instructions; when `items_human_ins.json` is there, the human instructions are the goals (as in the
paper's benchmark), otherwise the synthetic ones (251 goals on the slice). Goals are shuffled with the
original's fixed seed (233), so `goal-i` is the original's session i.

Split: the authors' (kokolerk/TCOD get_webshop_data.py): train = goals 0-4095, test = 4096-4195, later goals
unused, on data with at least 4,196 goals (the full catalogue's human goals, --env-data); on less, test is the last
min(100, n // 5) goals: on the bundled slice train goal-0..200, test goal-201..250 (see split_ranges).

The reward is the original's (princeton-nlp/WebShop engine/goal.py and normalize.py, with its pinned thefuzz 0.19.0):
side by side with that code on 1,716 purchases over the slice's 251 goals (exact, over budget, no option, one wrong
option, another product, options as a human goal's list, hand-made cases) the two agree on every one (issue 25's
closing note gives the command). Kept although odd: a synthetic goal's options (a dict) reach the colour normalizer
and the matcher as (name, value) pairs, so the goal's colour is not reduced while the chosen one is ("washed blue"
bought for "washed blue" becomes "ash" and misses). On the slice 230 of 251 exact purchases score 1.0 (251 with the
goals' colours reduced too); the other 21 goals have no demonstration. Human goals (plain lists) are not affected.

Deviations from the original, all deliberate:
* Randomness is seeded: the price of a product with a price range, and the "price lower than" limit of
  each goal, come from random.Random(seed) (the original uses the unseeded global RNG).
* Search: BM25 from `bm25s` (method "lucene", k1 0.9, b 0.4, Pyserini's defaults) over the same text as
  the original index (title, description, first bullet, options), instead of a Pyserini/Lucene index.
  The analyzer imitates Lucene's English one (lowercase, possessive 's dropped, Lucene's 33 stopwords)
  but stems only plurals (Lucene's EnglishMinimalStemmer rules), not Porter. Ties go to the earlier
  product. Only products that share a term with the query are returned (as Lucene does).
* Type reward: nouns in titles come from spaCy (en_core_web_sm, which goal.py loads, else _lg) when installed.
  Without spaCy's model (not installable in our environment) every alphabetic word that is not a function word
  counts as a noun, so adjectives ("red", "large") count too and a wrong product can match more of the goal's
  title. The side-by-side above gives the original this same noun filter, so it checks the rest of the rule.
* Fuzzy matching is thefuzz 0.19's token_set_ratio with its preprocessing (code points 128-255 deleted, so "café"
  matches "caf") and the Levenshtein ratio of its python-Levenshtein speedup, computed by rapidfuzz. Without the
  speedup thefuzz 0.19 uses difflib's SequenceMatcher, which scores some pairs differently (264 of the slice's
  2,759 attribute and option pairs), but none of them on the other side of the reward's threshold of 85.
* Pages follow the classic templates (the ones the papers' observations show), except that "Next >" is
  shown only while there are more results (the newer official template; the classic one always showed
  it and led to empty pages). The Reviews page is empty, as upstream (reviews are never loaded).
  The done page shows only the thanks line and the score (the original's text also leaked the goal).
* search[...] is accepted only on the search page, where the observation lists it (the original ran a
  search from any page). An unknown button or a malformed action gives Step(valid=False) with a message
  and the same page; the original silently did nothing. Text after the closing "]" makes an action
  malformed; the verb may be in any case ("Click[...]") and the argument is stripped before matching.
* An ASIN missing from the attribute file gets DUMMY_ATTR and no instruction instead of a KeyError. Not ported: images,
  the html observation mode, text_rich's whitespace (one string a line here), the Attributes page (show_attrs),
  num_products, filter_goals and limit_goals, and weighted goal sampling (tasks are listed in order; weights stay in
  goal["weight"]).
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import random
import re
from collections import defaultdict

import bm25s
import numpy as np
from rapidfuzz import fuzz

from envs import Step

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "webshop")
SEARCH_RETURN_N, PER_PAGE = 50, 10
PRICE_STEPS = [10.0 * i for i in range(1, 100)]  # goal price limits are drawn from these
GOAL_SHUFFLE_SEED = 233  # the original's fixed goal order
N_TRAIN, N_TEST = 4096, 100  # the authors' WebShop split: sessions 0-4095 train, 4096-4195 test
SEP = " [SEP] "
BACK, PREV, NEXT, BUY = "back to search", "< prev", "next >", "buy now"
SUB_PAGES = ("description", "features", "reviews")


# --------------------------------------------------------------------------------------------------
# Data: the official loader's cleaning, and the synthetic/human goals.


def parse_price(pricing) -> tuple[list[float], str]:
    """'$19.99$27.99' -> ([19.99, 27.99], '$19.99 to $27.99'); '' -> $100 like the engine."""
    values = [float(v) for v in (re.sub(r"[^\d.]", "", s) for s in (pricing or "").split("$")[1:]) if v]
    if not values:
        return [100.0], "$100.0"
    if len(values) == 1:
        return values, f"${values[0]}"
    return values[:2], f"${values[0]} to ${values[1]}"


def read_json(path: str):
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:  # a truncated download: name the file, not just a position
            raise ValueError(f"{path} is not valid JSON ({e}): download it again") from None


def load_products(products_path: str, ins_path: str, human: dict | None) -> list[dict]:
    ins, products, seen = read_json(ins_path), [], set()
    for p in read_json(products_path):
        asin = p["asin"]
        if asin == "nan" or len(asin) > 10 or asin in seen:
            continue
        seen.add(asin)
        options = {}
        for name, contents in (p["customization_options"] or {}).items():
            if contents is None:  # scraped option groups without values: the engine skips them
                continue
            options[name.lower()] = [c["value"].strip().replace("/", " | ").lower() for c in contents]
        bullets = p["small_description"]
        pricing, price_tag = parse_price(p.get("pricing"))
        a = ins.get(asin, {})
        products.append(
            dict(
                asin=asin, name=p["name"], Title=p["name"], Description=p["full_description"] or "",
                BulletPoints=bullets if isinstance(bullets, list) else [bullets],
                pricing=pricing, Price=price_tag, options=options, category=p["category"],
                query=p["query"].lower().strip(), product_category=p["product_category"],
                Attributes=a["attributes"] if "attributes" in a else ["DUMMY_ATTR"],
                instruction_text=a.get("instruction"), instruction_attributes=a.get("instruction_attributes"),
                human_instructions=(human or {}).get(asin, []),
            )
        )
    return products


def price_limit(price: float, rng: random.Random) -> tuple[float, str]:
    """The goal's budget: the larger of two of the four next multiples of $10 above the price."""
    steps = [p for p in PRICE_STEPS if p > price][:4]
    if len(steps) < 2:
        return 1000000, ""
    upper = sorted(rng.sample(steps, 2))[1]
    return upper, f", and price lower than {upper:.2f} dollars"


def make_goals(products: list[dict], prices: dict, human: bool, rng: random.Random) -> list[dict]:
    goals, att_count = [], defaultdict(int)
    for p in products:
        base = dict(asin=p["asin"], category=p["category"], query=p["query"], name=p["Title"],
                    product_category=p["product_category"])
        if human:  # one goal per human-written instruction that names attributes
            for h in p["human_instructions"]:
                if not h["instruction_attributes"]:
                    continue
                upper, price_text = price_limit(prices[p["asin"]], rng)
                goals.append(dict(base, instruction_text=h["instruction"].strip(".") + price_text,
                                  attributes=h["instruction_attributes"], price_upper=upper,
                                  goal_options=h["instruction_options"], weight=1.0))
            continue
        if p["instruction_text"] is None:
            continue
        upper, price_text = price_limit(prices[p["asin"]], rng)  # one budget per product, as upstream
        names = sorted(p["options"])
        for combo in itertools.product(*(p["options"][n] for n in names)):  # one goal per option combination
            goal_options = dict(zip(names, combo))
            option_text = ", and ".join(f"{k}: {v}" for k, v in goal_options.items())
            option_text = " with " + option_text if option_text else ""
            goals.append(dict(base, instruction_text=p["instruction_text"] + option_text + price_text,
                              attributes=p["instruction_attributes"], price_upper=upper, goal_options=goal_options))
            for att in p["instruction_attributes"]:
                att_count[att] += 1
    for g in goals:  # rare attributes weigh more (only used for weighted sampling); human goals weigh 1
        if "weight" not in g:
            g["weight"] = sum(1.0 / att_count[a] for a in g["attributes"]) / len(g["attributes"])
    return goals


# --------------------------------------------------------------------------------------------------
# Search: BM25 with Lucene's scoring and a light imitation of Lucene's English analyzer.

LUCENE_STOPWORDS = set(
    "a an and are as at be but by for if in into is it no not of on or such that the their then there "
    "these they this to was will with".split()
)


def plural_stem(w: str) -> str:
    """Lucene's EnglishMinimalStemmer: bottles -> bottle, batteries -> battery, shoes stays, boxes -> boxe."""
    if len(w) < 3 or w[-1] != "s" or w[-2] in "us":
        return w
    if w[-2] == "e":
        if len(w) > 3 and w[-3] == "i" and w[-4] not in "ae":
            return w[:-3] + "y"
        if w[-3] in "iaoe":
            return w
    return w[:-1]


def analyze(text: str) -> list[str]:
    words = re.findall(r"[^\W_]+(?:['.][^\W_]+)*", text.lower())
    words = [w[:-2] if w.endswith("'s") else w for w in words]
    return [plural_stem(w) for w in words if w not in LUCENE_STOPWORDS]


class SearchEngine:
    def __init__(self, products: list[dict]):
        docs = []
        for p in products:
            option_text = ", and ".join(f"{k}: {', '.join(v)}" for k, v in p["options"].items())
            first_bullet = p["BulletPoints"][0] if p["BulletPoints"] else ""
            docs.append(analyze(" ".join([p["Title"], p["Description"], first_bullet, option_text])))
        self.bm25 = bm25s.BM25(k1=0.9, b=0.4, method="lucene")
        self.bm25.index(docs, show_progress=False)

    def __call__(self, query: str, n: int = SEARCH_RETURN_N) -> list[int]:
        terms = [t for t in analyze(query) if t in self.bm25.vocab_dict]
        if not terms:
            return []
        scores = self.bm25.get_scores(terms)
        order = np.argsort(-scores, kind="stable")[:n]
        return [int(i) for i in order if scores[i] > 0]


# --------------------------------------------------------------------------------------------------
# Reward: the original get_reward (type x (attributes + options + price)).

COLOR_SET = (  # the original normalize.py list: an option value is reduced to the first color it contains
    "alabaster apricot aqua ash asphalt azure banana beige black blue blush bordeaux bronze brown burgundy "
    "camel camo caramel champagne charcoal cheetah chestnut chocolate christmas coffee cognac copper coral "
    "cranberry cream crystal dark denim eggplant elephant espresso fuchsia gold granite grape graphite grass "
    "gray green grey heather indigo ivory ivy khaki lavender lemon leopard light lilac lime magenta maroon "
    "mauve merlot midnight mint mocha multicolor mushroom mustard natural navy nude olive orange peach pewter "
    "pink plum purple rainbow red rose royal rust sand sapphire seashell silver skull slate steel stone "
    "stonewash sunflower tan taupe teal tiger turquoise violet walnut wheat white wine yellow"
).split()
FUNCTION_WORDS = LUCENE_STOPWORDS | set("about after all any both each from her his its more my other our over "
                                         "so some than too under up very what when which who with you your".split())
_nlp = None


def normalize_color(value) -> str:
    """The first COLOR_SET word inside `value`, else `value`. On a (name, value) pair, as the original's code passes a
    synthetic goal's options, `in` tests the pair's items for equality, so only a value that is exactly a colour
    word is reduced (see option_reward)."""
    return next((c for c in COLOR_SET if c in value), value)


LATIN1_HIGH = dict.fromkeys(range(128, 256))  # thefuzz 0.19 deletes these before matching ("café" -> "caf")


def fuzz_text(s) -> str:
    """thefuzz 0.19's preprocessing (the original pins thefuzz==0.19.0; full_process with force_ascii): str() of
    anything, code points 128-255 deleted, each non-word character (\\W, so "_" stays) a space, lowercase, stripped."""
    return re.sub(r"\W", " ", str(s).translate(LATIN1_HIGH)).lower().strip()


def fuzzy(a, b) -> int:
    """thefuzz 0.19's token_set_ratio: tokens split on whitespace, the best of three Levenshtein ratios (its
    python-Levenshtein speedup; rapidfuzz computes the same ratio), an int from 0 to 100."""
    return round(fuzz.token_set_ratio(fuzz_text(a), fuzz_text(b), processor=None))


def title_nouns(title: str) -> list[str]:
    """The title's nouns in order, repeats kept (the type score divides by their number, as the original)."""
    global _nlp
    if _nlp is None:  # first use: load spaCy if it and a model are installed, else remember the fallback
        try:
            import spacy

            # en_core_web_sm is what the original's goal.py loads; its setup.sh also fetches _lg
            models = [m for m in ("en_core_web_sm", "en_core_web_lg") if spacy.util.is_package(m)]
            _nlp = spacy.load(models[0]) if models else False
        except ImportError:
            _nlp = False
    if _nlp:
        return [t.text.lower() for t in _nlp(title) if t.pos_ in ("NOUN", "PROPN")]
    # fallback without spaCy: every alphabetic non-function word (see the module docstring)
    return [w for w in re.findall(r"[a-z]+", title.lower()) if len(w) > 1 and w not in FUNCTION_WORDS]


def type_reward(product: dict, goal: dict) -> dict:
    query_match = product["query"] == goal["query"]
    cats = [{c.strip() for c in x["product_category"].split("›")} for x in (product, goal)]
    category_match = len(cats[0] & cats[1]) >= 2
    wanted = title_nouns(goal["name"])
    # shared distinct nouns over the goal's noun count with repeats (the original's list): "cat toy cat" vs "cat" = 1/3
    title_score = len(set(title_nouns(product["name"])) & set(wanted)) / len(wanted) if wanted else 0.2
    r_type = 1.0 if (query_match or category_match or title_score > 0.2) else 0.5
    if title_score < 0.1:
        r_type = 0.1
    if title_score == 0.0:
        r_type = 0.0
    return dict(r_type=r_type, query_match=query_match, category_match=category_match, title_score=title_score)


def in_text(s: str, product: dict) -> bool:
    """The original's last resort for an attribute: it appears in the title, the bullets or the description."""
    texts = (product["Title"], " ".join(product["BulletPoints"]), product["Description"])
    return any(s in t.lower() for t in texts)


def option_reward(chosen: list[str], goal_options) -> tuple[float | None, int]:
    """The goal's options that some chosen option matches (fuzzy > 85, sizes too), counted over the goal's options.
    A synthetic goal's dict reaches the matcher as (name, value) pairs, as in the original: "('color', 'navy blue')"
    gives the tokens "color navy blue" (see the module docstring). Human goals list plain values."""
    wanted = list(goal_options.items()) if isinstance(goal_options, dict) else list(goal_options)
    chosen = [normalize_color(o) for o in chosen]
    hits = sum(any(fuzzy(p, normalize_color(g)) > 85 for p in chosen) for g in wanted)
    return (hits / len(wanted) if wanted else None), hits


def get_reward(product: dict, goal: dict, price: float, options: dict) -> tuple[float, dict]:
    info = type_reward(product, goal)
    attrs = goal["attributes"]
    n_attr = sum(any(fuzzy(p, g) > 85 for p in product["Attributes"]) or in_text(g, product) for g in attrs)
    r_option, n_opt = option_reward(list(options.values()), goal["goal_options"])
    price_ok = price <= goal["price_upper"]
    total = len(attrs) + len(goal["goal_options"]) + 1
    reward = (n_attr + n_opt + price_ok) / total * info["r_type"]
    info.update(r_att=n_attr / len(attrs), r_option=r_option, r_price=price_ok)
    return reward, info


def split_ranges(n_goals: int) -> dict[str, range]:
    """The authors' split (train on sessions 0-4095, test on the 100 after them; the original WebShop papers test on
    0-499 instead) on n goals; on fewer than 4,196 goals, test is the last min(100, n // 5), train the rest."""
    n_test = min(N_TEST, n_goals // 5)
    n_train = min(N_TRAIN, n_goals - n_test)
    return {"train": range(n_train), "test": range(n_train, n_train + n_test)}


# --------------------------------------------------------------------------------------------------
# The environment: a small state machine over the original's pages.


class WebShop:
    name = "webshop"
    max_turns = 15
    splits = ("train", "test")
    eval_splits = ("test",)
    instructions = (
        "You are shopping on a web store for the item described in the instruction. Each page is shown as "
        "text, its parts separated by [SEP]. Act with search[your query] on the search page, or click[button] "
        "with one of the listed buttons (product ids, options, Next >, < Prev, Description, Buy Now, ...). "
        "Pick the options the instruction asks for before you click Buy Now; buying ends the episode."
    )

    def __init__(self, data: str | None = None, seed: int = 0, human_goals: bool | None = None):
        data = data or DATA_DIR
        found = sorted(glob.glob(os.path.join(data, "items_shuffle*.json")))
        if not found:
            raise FileNotFoundError(f"no items_shuffle*.json in {data}")
        products_path = found[0]  # name order: the full items_shuffle.json before _1000 before _mini
        suffix = os.path.basename(products_path)[len("items_shuffle"):]
        ins_path = os.path.join(data, "items_ins_v2" + suffix)
        if not os.path.exists(ins_path):
            ins_path = sorted(glob.glob(os.path.join(data, "items_ins_v2*.json")))[0]
        human_path = os.path.join(data, "items_human_ins.json")
        self.human_goals = os.path.exists(human_path) if human_goals is None else human_goals
        rng = random.Random(seed)
        self.products = load_products(products_path, ins_path, read_json(human_path) if self.human_goals else None)
        self.by_asin = {p["asin"]: p for p in self.products}
        # what a product costs at checkout: one draw inside its price range (upstream: at load time)
        self.prices = {p["asin"]: p["pricing"][0] if len(p["pricing"]) == 1 else rng.uniform(*p["pricing"])
                       for p in self.products}
        self.goals = make_goals(self.products, self.prices, self.human_goals, rng)
        if not self.goals:  # an empty or mismatched products file: no task at all, say so rather than score 0 of 0
            raise ValueError(f"{products_path} gives no WebShop task (no products with instructions): check the data files")
        random.Random(GOAL_SHUFFLE_SEED).shuffle(self.goals)
        self.search = SearchEngine(self.products)
        self.goal, self.s = None, None

    def tasks(self, split: str) -> list[str]:
        ranges = split_ranges(len(self.goals))
        if split not in ranges:
            raise ValueError(f"webshop has splits {self.splits}, not {split!r}")
        return [f"goal-{i}" for i in ranges[split]]

    def _goal(self, task: str) -> dict:
        return self.goals[int(task.rsplit("-", 1)[1])]

    def task_type(self, task: str) -> str:
        return self._goal(task)["category"]

    # ---- pages ----
    def _page(self) -> tuple[list[tuple[str, str]], list[str], dict]:
        """The visible strings of the current page, each with its kind (text, button, option or product: the rich
        text marks the last three), its buttons (lowercase, page order), option -> group."""
        s, p = self.s, self.by_asin.get(self.s["asin"])
        head = [("text", "Instruction:"), ("text", self.goal["instruction_text"])]
        if s["page"] == "search":
            return [("text", "WebShop"), *head, ("button", "Search")], [], {}
        if s["page"] == "done":
            return [("text", t) for t in ("Thank you for shopping with us!", "Your score (min 0.0, max 1.0)",
                                          str(s["reward"]))], [], {}
        items, buttons, groups = [*head, ("button", "Back to Search")], [BACK], {}

        def button(text, kind="button"):
            items.append((kind, text))
            if text.lower() not in buttons:
                buttons.append(text.lower())

        if s["page"] == "results":
            n, k = len(s["hits"]), s["pageno"]
            items.append(("text", f"Page {k} (Total results: {n})"))
            if k > 1:
                button("< Prev")
            if k * PER_PAGE < n:
                button("Next >")
            for i in s["hits"][(k - 1) * PER_PAGE : k * PER_PAGE]:
                q = self.products[i]
                button(q["asin"], "product")
                items += [("text", q["Title"]), ("text", q["Price"])]
        elif s["page"] == "item":
            button("< Prev")
            for name, values in p["options"].items():
                items.append(("text", name))
                for v in values:
                    button(v, "option")
                    groups[v] = name  # a value shared by two groups selects the later one, as upstream
            items += [("text", p["Title"]), ("text", f"Price: {p['Price']}"), ("text", "Rating: N.A.")]
            for b in ("Description", "Features", "Reviews", "Buy Now"):
                button(b)
        else:  # a sub page: Description, Features or Reviews
            button("< Prev")
            items += [("text", t) for t in {"description": [p["Description"]], "features": p["BulletPoints"],
                                            "reviews": []}[s["sub"]]]
        return [(kind, t.strip()) for kind, t in items if t and t.strip()], buttons, groups

    def _rich(self, items: list[tuple[str, str]]) -> str:
        """The page as the original's text_rich mode marks it, one string a line: buttons as "[button] X [button_]",
        the options picked on this item and the products opened since the last search page as "[clicked button] X
        [clicked button_]", and for each picked option a "You have clicked X." line on top (the original prepends them
        one by one, so the last in page order comes first). The simple text hides both, so a student reading it
        cannot see what it has already picked."""
        picked, opened = set(self.s["options"].values()), self.s["asins"]
        lines, notes = [], []
        for kind, t in items:
            clicked = kind == "option" and t in picked or kind == "product" and t.upper() in opened
            if clicked and kind == "option":
                notes.insert(0, f"You have clicked {t}.")
            lines.append(t if kind == "text" else f"[clicked button] {t} [clicked button_]" if clicked
                         else f"[button] {t} [button_]")
        return "\n".join(notes + lines)

    def _observe(self, before: str = "", **kw) -> Step:
        """The page as a Step: the compact observation is its simple text (the strings joined by [SEP]) then one line
        of admissible actions; the scene (the paper prompt's) is its rich text (`_rich`), the actions apart."""
        items, buttons, _ = self._page()
        simple, scene = before + SEP.join(t for _, t in items), before + self._rich(items)
        if self.s["page"] == "done":
            return Step(simple, scene=scene, task=self.goal["instruction_text"], **kw)
        acts = ["search[...]"] if self.s["page"] == "search" else [f"click[{b}]" for b in buttons]
        return Step(f"{simple}\nactions: {', '.join(acts)}", scene=scene, actions=acts, task=self.goal["instruction_text"],
                    **kw)

    def _new_state(self) -> dict:
        # asins: the products opened since the last search page (the original forgets them on Back to Search)
        return dict(page="search", hits=[], pageno=1, asin=None, asins=set(), options={}, sub=None, reward=0.0)

    def reset(self, task: str) -> Step:
        self.goal, self.s = self._goal(task), self._new_state()
        return self._observe(info={"task": task})

    def _invalid(self, why: str) -> Step:
        return self._observe(f"Invalid action: {why}.\n", valid=False)

    def step(self, action: str) -> Step:
        s = self.s
        if s["page"] == "done":
            return Step("The episode is over: you already bought an item.", done=True, valid=False,
                        success=s["reward"] >= 1.0 - 1e-9, score=s["reward"])
        m = re.fullmatch(r"\s*(search|click)\[(.*)\]\s*", action, re.IGNORECASE | re.DOTALL)
        if not m or not m.group(2).strip():
            return self._invalid(f"{action!r} is not of the form search[query] or click[button]")
        verb, arg = m.group(1).lower(), m.group(2).strip().lower()
        if verb == "search":
            if s["page"] != "search":
                return self._invalid("search[...] works only on the search page; click[back to search] first")
            s.update(page="results", hits=self.search(" ".join(arg.split())), pageno=1, asin=None, options={})
            return self._observe()
        _, buttons, groups = self._page()
        if arg not in buttons:
            return self._invalid(f"there is no button {arg!r} on this page")
        if arg == BACK:
            self.s = self._new_state()
        elif arg == NEXT:
            s["pageno"] += 1
        elif arg == PREV and s["page"] == "results":
            s["pageno"] -= 1
        elif arg == PREV and s["page"] == "item":  # back to the results; the original re-searches and drops options
            s.update(page="results", asin=None, options={})
        elif arg == PREV:  # from a sub page back to its item page, options kept
            s["page"] = "item"
        elif s["page"] == "results":  # a product id
            s.update(page="item", asin=arg.upper(), options={})
            s["asins"].add(s["asin"])
        elif arg in SUB_PAGES:  # checked before options, as upstream
            s.update(page="sub", sub=arg)
        elif arg in groups:
            s["options"][groups[arg]] = arg
        else:  # buy now
            reward, info = get_reward(self.by_asin[s["asin"]], self.goal, self.prices[s["asin"]], s["options"])
            s.update(page="done", reward=reward)
            info.update(asin=s["asin"], options=dict(s["options"]))
            return self._observe(done=True, success=reward >= 1.0 - 1e-9, score=reward, info=info)
        return self._observe()

    def demo(self, task: str) -> list[str] | None:
        """The expert: search the goal's query, page to the goal product, pick the goal options, buy.
        None when the product is not in the top 50 or the purchase would not reach reward 1.0."""
        goal = self._goal(task)
        saved = self.goal, self.s  # a demo must not disturb an episode in progress
        try:
            self.reset(task)
            actions = [f"search[{goal['query']}]"]
            self.step(actions[0])
            rank = next((r for r, i in enumerate(self.s["hits"]) if self.products[i]["asin"] == goal["asin"]), None)
            if rank is None:
                return None
            options = goal["goal_options"]
            options = options.values() if isinstance(options, dict) else options
            actions += [f"click[{NEXT}]"] * (rank // PER_PAGE) + [f"click[{goal['asin'].lower()}]"]
            actions += [f"click[{o}]" for o in options] + [f"click[{BUY}]"]
            for a in actions[1:]:
                step = self.step(a)
            return actions if step.success else None
        finally:
            self.goal, self.s = saved

    def close(self):
        pass
