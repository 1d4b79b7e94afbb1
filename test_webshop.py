"""Tests for webshop.py on the bundled real 65-product slice. Expected values were worked out by hand from the
data files (see data/webshop/README.md). The type reward is checked with the no-spaCy noun filter."""

import itertools
import json
import os
import re
import shutil
import time

import pytest

import webshop
from webshop import WebShop, analyze, fuzzy, get_reward, option_reward, parse_price, split_ranges, type_reward

WS_SLICE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "webshop")


@pytest.fixture(scope="module")
def shop():
    saved, webshop._nlp = webshop._nlp, False  # the documented fallback noun filter, whatever is installed
    yield WebShop()
    webshop._nlp = saved


def ws_goal_index(shop, asin, **options):
    return next(i for i, g in enumerate(shop.goals) if g["asin"] == asin and g["goal_options"] == options)


def ws_open_item(shop, task, query, asin):
    """reset, search, page forward until `asin` is listed, open it."""
    shop.reset(task)
    st = shop.step(f"search[{query}]")
    while f"click[{asin.lower()}]" not in st.observation:
        assert "click[next >]" in st.observation, f"{asin} not found for {query!r}"
        st = shop.step("click[next >]")
    return shop.step(f"click[{asin}]")


def ws_buy(shop, task, query, asin, options=()):
    ws_open_item(shop, task, query, asin)
    for o in options:
        assert shop.step(f"click[{o}]").valid
    return shop.step("click[Buy Now]")


# ---- data -------------------------------------------------------------------------------------------


def test_data_counts_and_splits(shop):
    assert len(shop.products) == 65 and len(shop.goals) == 251
    cats = {}
    for p in shop.products:
        cats[p["category"]] = cats.get(p["category"], 0) + 1
    assert cats == {"beauty": 18, "fashion": 15, "electronics": 14, "garden": 12, "grocery": 6}
    test, train = shop.tasks("test"), shop.tasks("train")
    assert (len(test), len(train)) == (50, 201)  # fewer than 4,196 goals: train first, then a fifth as test
    assert train[0] == "goal-0" and test[0] == "goal-201" and test[-1] == "goal-250" and not set(test) & set(train)
    assert shop.task_type("goal-0") == "fashion"
    with pytest.raises(ValueError):
        shop.tasks("valid")


def test_split_is_the_authors_on_the_full_data():
    # kokolerk/TCOD get_webshop_data.py: sessions 0-4095 train, 4096-4195 test; the rest of the goals unused
    for n in (4196, 12087):
        assert split_ranges(n) == {"train": range(4096), "test": range(4096, 4196)}
    assert split_ranges(251) == {"train": range(201), "test": range(201, 251)}
    assert split_ranges(4000) == {"train": range(3900), "test": range(3900, 4000)}


def test_data_edge_cases(shop):
    assert parse_price("") == ([100.0], "$100.0")
    assert parse_price("$19.99$27.99") == ([19.99, 27.99], "$19.99 to $27.99")
    assert parse_price("$1,847.00") == ([1847.0], "$1847.0")
    wifi = shop.by_asin["B09SWLPPVQ"]  # pricing "" and a string as bullet list
    assert (wifi["Price"], shop.prices["B09SWLPPVQ"]) == ("$100.0", 100.0)
    assert len(wifi["BulletPoints"]) == 1 and wifi["BulletPoints"][0].startswith("[1200Mbps HIGH-SPEED")
    dress = shop.by_asin["B08ZRR3DZT"]
    assert dress["Price"] == "$19.99 to $27.99" and 19.99 <= shop.prices["B08ZRR3DZT"] <= 27.99
    sofa_goals = [g for g in shop.goals if g["asin"] == "B09688C4XM"]  # $1,847.00: no price step above it
    assert shop.prices["B09688C4XM"] == 1847.0 and len(sofa_goals) == 8
    assert all(g["price_upper"] == 1000000 and "price lower" not in g["instruction_text"] for g in sofa_goals)
    assert shop.by_asin["B01LM6W7Z6"]["options"] == {"size": ["3 shelves", "4 shelves", "5 shelves"]}  # Color: null
    assert shop.by_asin["B08T84R7V2"]["options"]["color"] == ["black | white", "white | black"]  # '/' -> ' | '
    assert shop.by_asin["B09M4C31FL"]["options"]["size"] == ["0.53oz | 15g x 10", "1.41oz | 40g x 10"]
    assert shop.by_asin["B001EHF3KK"]["Attributes"] == []  # an empty list stays empty, as upstream


def test_seeded_goals_are_reproducible(shop):
    again, other = WebShop(seed=0), WebShop(seed=1)
    assert [g["instruction_text"] for g in again.goals] == [g["instruction_text"] for g in shop.goals]
    assert again.prices == shop.prices
    assert other.prices != shop.prices  # prices inside a range are drawn from the seed
    assert [g["asin"] for g in other.goals] == [g["asin"] for g in shop.goals]  # the goal order is the fixed one


# ---- pages ------------------------------------------------------------------------------------------


def test_search_page(shop):
    st = shop.reset("goal-105")
    instr = "Find me eyes makeup for nail polish, nail art with size: 3 shelves, and price lower than 30.00 dollars"
    assert st.observation == f"WebShop [SEP] Instruction: [SEP] {instr} [SEP] Search\nactions: search[...]"
    assert not st.done and st.valid


def test_results_pages_and_pagination(shop):
    shop.reset("goal-0")
    st = shop.step("search[Men's Sweaters]")
    # BM25 returns exactly the products whose indexed text has a query term ("men" or a sweater(s) word)
    def indexed(p):
        opts = " ".join(f"{k}: {', '.join(v)}" for k, v in p["options"].items())
        return " ".join([p["Title"], p["Description"], p["BulletPoints"][0], opts]).lower()

    expected = {p["asin"] for p in shop.products if re.search(r"\bmens?\b|\bsweaters?\b", indexed(p))}
    hits = [shop.products[i]["asin"] for i in shop.s["hits"]]
    assert set(hits) == expected and len(hits) == 13
    first = st.observation
    assert first.startswith("Instruction: [SEP] Find me machine wash, wash cold men's sweaters")
    assert "[SEP] Back to Search [SEP] Page 1 (Total results: 13) [SEP] Next > [SEP] " in first
    assert "< Prev" not in first
    assert first.count("click[b0") == 10
    p = shop.by_asin[hits[0]]
    assert f"Next > [SEP] {p['asin']} [SEP] {p['Title']} [SEP] {p['Price']} [SEP]" in first
    assert first.split("\nactions: ")[1].startswith("click[back to search], click[next >], click[" + hits[0].lower())
    st = shop.step("click[Next >]")  # case-insensitive, like the original
    assert "Page 2 (Total results: 13) [SEP] < Prev [SEP] " + hits[10] in st.observation
    assert "Next >" not in st.observation and st.observation.count("click[b0") == 3
    assert not shop.step("click[next >]").valid  # no page 3
    assert shop.step("click[< prev]").observation == first
    assert not shop.step("click[< prev]").valid  # page 1 has no < Prev
    # an item opened from page 2 goes back to page 2, and back to search resets everything
    shop.step("click[next >]")
    shop.step(f"click[{hits[12]}]")
    assert "Page 2 (Total results: 13)" in shop.step("click[< prev]").observation
    assert shop.step("click[back to search]").observation == shop.reset("goal-0").observation


def test_search_ranking_is_lucene_bm25(shop):
    """Our ranking equals BM25 computed by hand with Lucene's formula and Pyserini's k1=0.9, b=0.4."""
    import math

    docs = []
    for p in shop.products:
        opts = ", and ".join(f"{k}: {', '.join(v)}" for k, v in p["options"].items())
        docs.append(analyze(" ".join([p["Title"], p["Description"], p["BulletPoints"][0], opts])))
    avgdl, n = sum(map(len, docs)) / len(docs), len(docs)
    for query in ["crewneck sweater pullover", "nail polish shelves", "organic gluten free cereal"]:
        terms = analyze(query)
        scores = []
        for d in docs:
            s = 0.0
            for t in terms:
                df, tf = sum(t in x for x in docs), d.count(t)
                idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
                s += idf * tf / (tf + 0.9 * (1 - 0.4 + 0.4 * len(d) / avgdl))
            scores.append(s)
        assert shop.search.bm25.get_scores(terms) == pytest.approx(scores, rel=1e-4)
        expected = sorted((i for i in range(n) if scores[i] > 0), key=lambda i: (-round(scores[i], 4), i))[:50]
        got = shop.search(query)
        assert [round(scores[i], 4) for i in got] == [round(scores[i], 4) for i in expected] and len(got) >= 3


def test_item_page(shop):
    st = ws_open_item(shop, "goal-105", "eyes makeup", "B01LM6W7Z6")
    instr = shop.goals[105]["instruction_text"]
    title = ("BY ALEGORY Acrylic Makeup Wall Organizing Shelves Nail Polish, Eyelashes, Foundations Cosmetics | "
             "12 inch shelf (Pack of 4) Hardware Incl'd")
    assert st.observation == (
        f"Instruction: [SEP] {instr} [SEP] Back to Search [SEP] < Prev [SEP] size [SEP] 3 shelves [SEP] 4 shelves "
        f"[SEP] 5 shelves [SEP] {title} [SEP] Price: $16.99 [SEP] Rating: N.A. [SEP] Description [SEP] Features "
        "[SEP] Reviews [SEP] Buy Now\nactions: click[back to search], click[< prev], click[3 shelves], "
        "click[4 shelves], click[5 shelves], click[description], click[features], click[reviews], click[buy now]"
    )


def test_sub_pages_keep_options(shop):
    item = ws_open_item(shop, "goal-2", "sweatyrocks oversized sweater", "B09KRLGSC5").observation
    head = f"Instruction: [SEP] {shop.goals[2]['instruction_text']} [SEP] Back to Search [SEP] < Prev [SEP] "
    acts = "\nactions: click[back to search], click[< prev]"
    desc = shop.by_asin["B09KRLGSC5"]["Description"].strip()
    assert shop.step("click[mocha brown]").observation == item  # simple text mode does not mark the choice
    assert shop.step("click[Description]").observation == head + desc + acts
    assert shop.step("click[< Prev]").observation == item
    st = shop.step("click[reviews]")
    assert st.observation == head[: -len(" [SEP] ")] + acts  # reviews are never loaded upstream either
    shop.step("click[< prev]")
    st = shop.step("click[buy now]")
    assert st.done and st.info["options"] == {"color": "mocha brown"}
    ws_open_item(shop, "goal-2", "sweatyrocks oversized sweater", "B09KRLGSC5")
    shop.step("click[black]")
    shop.step("click[< prev]")  # back to the results: the original re-searches, which clears the options
    shop.step("click[b09krlgsc5]")
    assert shop.step("click[buy now]").info["options"] == {}
    # Features of the product whose bullet list is a single string: one entry
    ws_open_item(shop, "goal-244", "wifi extender", "B09SWLPPVQ")
    feats = shop.step("click[features]").observation
    assert feats == (f"Instruction: [SEP] {shop.goals[244]['instruction_text']} [SEP] Back to Search [SEP] < Prev "
                     f"[SEP] {shop.by_asin['B09SWLPPVQ']['BulletPoints'][0].strip()}" + acts)


def test_rich_text_marks_the_options_picked_and_products_opened(shop):
    """The scene (what the paper prompt shows) is the original's text_rich page, as the authors' env renders it:
    buttons marked, the options picked on this item and the products opened since the last search page marked as
    clicked, and a line per picked option on top, the last in page order first. The simple text hides all of it."""
    item = ws_open_item(shop, "goal-2", "sweatyrocks oversized sweater", "B09KRLGSC5")
    instr = shop.goals[2]["instruction_text"]
    p = shop.by_asin["B09KRLGSC5"]
    buttons = lambda names: [f"[button] {n} [button_]" for n in names]  # noqa: E731
    tail = [p["Title"], f"Price: {p['Price']}", "Rating: N.A.", *buttons(["Description", "Features", "Reviews", "Buy Now"])]
    assert item.scene.split("\n") == [
        "Instruction:", instr, *buttons(["Back to Search", "< Prev"]), "size",
        *buttons(["x-small", "small", "medium", "large"]), "color", *buttons(["black", "coffee brown", "mocha brown"]),
        *tail]
    shop.step("click[mocha brown]")
    st = shop.step("click[small]")
    assert st.observation == item.observation  # the simple text: no mark
    assert st.scene.split("\n") == [
        "You have clicked mocha brown.", "You have clicked small.", "Instruction:", instr,
        *buttons(["Back to Search", "< Prev"]), "size", *buttons(["x-small"]), "[clicked button] small [clicked button_]",
        *buttons(["medium", "large"]), "color", *buttons(["black", "coffee brown"]),
        "[clicked button] mocha brown [clicked button_]", *tail]
    assert "clicked" not in shop.step("click[description]").scene  # a sub page shows no options
    # back on the results the opened product is marked; a new search page forgets it (as the original's session)
    shop.step("click[< prev]")
    results = shop.step("click[< prev]").scene
    assert "\n[clicked button] B09KRLGSC5 [clicked button_]\n" in results and results.count("[clicked button]") == 1
    shop.step("click[back to search]")
    assert "clicked" not in shop.step("search[sweatyrocks oversized sweater]").scene
    assert shop.reset("goal-105").scene.split("\n") == [
        "WebShop", "Instruction:", shop.goals[105]["instruction_text"], "[button] Search [button_]"]


def test_invalid_and_malformed_actions(shop):
    start = shop.reset("goal-0").observation
    for bad in ["buy it", "click[]", "search[ ]", "click[search]", "click[buy now]", "search[a] now", "[x]"]:
        st = shop.step(bad)
        assert not st.valid and not st.done and st.score == 0.0
        assert st.observation.startswith("Invalid action: ") and st.observation.endswith(start)
    results = shop.step("search[men's sweaters]").observation
    for bad in ["search[red shoes]", "click[b0000000]", "click[buy now]", "click[description]", "click[5x-large]"]:
        st = shop.step(bad)
        assert not st.valid and st.observation.endswith(results)
    assert "no button 'b0000000'" in shop.step("click[B0000000]").observation
    st = ws_buy(shop, "goal-0", "men's sweaters", "B01KI9HU1O", ["5X-Large"])
    assert st.done and st.success
    after = shop.step("click[back to search]")
    assert after.done and not after.valid and after.score == st.score


# ---- reward -----------------------------------------------------------------------------------------


def test_reward_hand_checked(shop):
    # goal-0: 4 attributes (all in the product's list), 1 option (size 5x-large), budget $60; price in $23.99-29.99
    st = ws_buy(shop, "goal-0", "men's sweaters", "B01KI9HU1O", ["5x-large"])
    assert st.score == 1.0 and st.success and st.observation.endswith("[SEP] 1.0")
    # a wrong size: "medium" vs the goal's ('size', '5x-large') scores under 85
    st = ws_buy(shop, "goal-0", "men's sweaters", "B01KI9HU1O", ["medium"])
    assert st.score == pytest.approx(5 / 6) and not st.success and st.info["r_option"] == 0.0
    # an option found only in the product text does not count ("Size Small: Chest Width..." is a bullet)
    assert ws_buy(shop, "goal-0", "men's sweaters", "B01KI9HU1O", ["small"]).score == pytest.approx(5 / 6)
    assert ws_buy(shop, "goal-0", "men's sweaters", "B01KI9HU1O").score == pytest.approx(5 / 6)  # no option chosen
    saved = shop.prices["B01KI9HU1O"]
    shop.prices["B01KI9HU1O"] = 61.0  # over the $60 budget
    try:
        assert ws_buy(shop, "goal-0", "men's sweaters", "B01KI9HU1O", ["5x-large"]).score == pytest.approx(5 / 6)
        assert ws_buy(shop, "goal-0", "men's sweaters", "B01KI9HU1O", ["medium"]).score == pytest.approx(4 / 6)
    finally:
        shop.prices["B01KI9HU1O"] = saved
    # wrong type: a men's eau de toilette shares only "men" of 7 title words: 1/7 in [0.1, 0.2] and no query or
    # category match -> r_type 0.5; no attribute matches, price ok -> 0.5 * 1/6
    st = ws_buy(shop, "goal-0", "oriental eau de toilette", "B08XQWJX8P")
    assert st.info["r_type"] == 0.5 and st.info["title_score"] == pytest.approx(1 / 7)
    assert st.score == pytest.approx(0.5 / 6)
    assert ws_buy(shop, "goal-0", "reclaimed wood console table", "B06Y3VLDFB").score == 0.0  # no shared title word
    # a null option group leaves size only: 2 attributes + 1 option + price. "5 shelves" against the goal's
    # ('size', '3 shelves') scores 88 (token "shelves" shared): above 85, a hit, as in the original
    assert fuzzy("5 shelves", ("size", "3 shelves")) == 88
    assert ws_buy(shop, "goal-105", "eyes makeup", "B01LM6W7Z6", ["5 shelves"]).score == 1.0
    assert ws_buy(shop, "goal-105", "eyes makeup", "B01LM6W7Z6").score == pytest.approx(3 / 4)
    assert ws_buy(shop, "goal-105", "eyes makeup", "B01LM6W7Z6", ["3 shelves"]).score == 1.0
    # the chosen colour is reduced to its first colour word ("mocha brown" -> "brown"), whose tokens are a subset of
    # the goal's pair ('color', 'coffee brown'): token_set_ratio 100
    assert shop.goals[45]["goal_options"] == {"color": "coffee brown", "size": "x-small"}  # fuzzy score alone: 62
    assert ws_buy(shop, "goal-45", "sweatyrocks sweater", "B09KRLGSC5", ["mocha brown", "x-small"]).score == 1.0
    g6 = shop.goals[6]
    assert g6["goal_options"] == {"color": "black | white", "size": "10.5"}
    assert ws_buy(shop, "goal-6", "levi's sneaker", "B08T84R7V2", ["white | black", "10.5"]).score == 1.0


def test_type_reward_rules_and_fuzzy(shop):
    def r_type(product_name, goal_name, query="q", cat="a › b"):
        prod = dict(name=product_name, query="other", product_category="x › y")
        return type_reward(prod, dict(name=goal_name, query=query, product_category=cat))["r_type"]

    ten = "alpha beta gamma delta epsilon zeta theta iota kappa lambda"
    assert r_type("alpha", ten + " omega") == 0.1  # 1/11 < 0.1
    assert r_type("alpha", "alpha beta gamma delta epsilon") == 0.5  # 1/5 is not > 0.2, no query/category match
    assert r_type("alpha beta", "alpha beta gamma delta epsilon") == 1.0  # 2/5 > 0.2
    assert r_type("omega", "alpha beta") == 0.0
    # a query match does not save a title that shares under 10% of its nouns
    prod = dict(name="alpha", query="q", product_category="x › y")
    goal = dict(name=ten + " omega", query="q", product_category="z")
    assert type_reward(prod, goal)["r_type"] == 0.1
    # thefuzz semantics: lowercase, punctuation dropped, an int score
    assert fuzzy("Machine-Wash", "machine wash") == 100 and isinstance(fuzzy("a b", "a c"), int)
    assert fuzzy("coffee brown", "mocha brown") == 62


# ---- reward: each difference that issue 25 found from the original goal.py, on a case where the two differ ----


@pytest.fixture(scope="module")
def sweater(shop):
    """B01KI9HU1O (men's sweater, sizes small..5x-large; "Size Small" in a bullet) and its goal, price in budget."""
    p = shop.by_asin["B01KI9HU1O"]
    return p, shop.goals[0], shop.prices["B01KI9HU1O"]


def test_option_found_only_in_the_product_text_does_not_count(sweater):
    p, goal, price = sweater
    assert webshop.in_text("small", p)  # the attribute fallback would find it
    reward, info = get_reward(p, dict(goal, goal_options=["5x-large"]), price, {"size": "small"})
    assert info["r_option"] == 0.0 and reward == pytest.approx(5 / 6)  # was 1.0 through the text fallback


def test_sizes_match_fuzzily_like_other_options(sweater):
    p, goal, price = sweater
    # a human goal's "small" and the chosen "x-small": tokens {x, small} contain {small}, token_set_ratio 100
    assert option_reward(["x-small"], ["small"]) == (1.0, 1)  # an exact size rule said 0
    assert get_reward(p, dict(goal, goal_options=["small"]), price, {"size": "x-small"})[0] == 1.0
    # a synthetic goal's pair ('size', 'small') against "x-small": 83, not above 85
    assert fuzzy("x-small", ("size", "small")) == 83 and option_reward(["x-small"], {"size": "small"}) == (0.0, 0)


def test_options_count_over_the_goal_and_the_reward_stays_at_most_one(shop, sweater):
    p, goal, price = sweater
    # one goal option, two chosen options that both match it: one hit, not two (counting chosen options gave 7/6)
    chosen = {"size": "5x-large", "color": "5x-large"}
    assert option_reward(list(chosen.values()), ["5x-large"]) == (1.0, 1)
    assert get_reward(p, dict(goal, goal_options=["5x-large"]), price, chosen)[0] == 1.0
    # two goal options met by one chosen option count twice, as the original
    assert option_reward(["x-large"], ["x-large", "large x"]) == (1.0, 2)
    # every purchase of every option combination of a goal's product, for the goal and as a human goal's list
    worst = 0.0
    for g in shop.goals[::3]:
        q = shop.by_asin[g["asin"]]
        names = sorted(q["options"])
        for combo in itertools.islice(itertools.product(*(q["options"][n] for n in names)), 12):
            chosen = dict(zip(names, combo))
            values = list(g["goal_options"].values())
            for goal_options in (g["goal_options"], values, values[:1], values * 2):
                worst = max(worst, get_reward(q, dict(g, goal_options=goal_options), 0.0, chosen)[0])
    assert worst == 1.0


def test_type_score_divides_by_the_goal_nouns_with_repeats():
    prod = dict(name="alpha", query="other", product_category="x › y")
    goal = dict(name="alpha beta alpha beta gamma", query="q", product_category="a › b")
    info = type_reward(prod, goal)
    # 1 shared noun of 5 (with repeats): 0.2 is not above 0.2 -> 0.5; over the 3 distinct nouns it was 1/3 -> 1.0
    assert info["title_score"] == pytest.approx(0.2) and info["r_type"] == 0.5


def test_synthetic_goal_colours_are_matched_as_the_original_pairs(shop, sweater):
    # the goal's (name, value) pair is not reduced to a colour word unless the value is exactly one; the chosen value is
    assert option_reward(["washed blue"], {"color": "washed blue"}) == (0.0, 0)  # "ash" vs "color washed blue"
    assert option_reward(["washed blue"], ["washed blue"]) == (1.0, 1)  # a human goal's value is reduced too
    assert webshop.normalize_color(("color", "black")) == "black"  # a value that is exactly a colour word
    assert webshop.normalize_color(("color", "navy blue")) == ("color", "navy blue")
    # measured effect on the slice: 230 of 251 exact purchases score 1.0 (all 251 with the goals' colours reduced)
    exact = [get_reward(shop.by_asin[g["asin"]], g, shop.prices[g["asin"]], g["goal_options"])[0] for g in shop.goals]
    assert sum(r == 1.0 for r in exact) == 230
    reduced = [get_reward(shop.by_asin[g["asin"]], dict(g, goal_options=list(g["goal_options"].values())),
                          shop.prices[g["asin"]], g["goal_options"])[0] for g in shop.goals]
    assert sum(r == 1.0 for r in reduced) == 251


def test_matcher_deletes_code_points_128_to_255_and_keeps_underscores():
    assert fuzzy("café", "caf") == 100  # "é" is deleted, as thefuzz 0.19; keeping it scored 86
    assert fuzzy("café", "cafe") == 86
    assert fuzzy("a_b", "a b") == 67  # "_" is a word character for \W: one token "a_b" (replacing it scored 100)
    assert fuzzy("Wool-Blend, Navy!", "navy wool blend") == 100


def test_reward_edge_cases(shop):
    wifi, goal = shop.by_asin["B09SWLPPVQ"], shop.goals[244]  # missing price -> $100; bullets given as one string
    assert goal["asin"] == "B09SWLPPVQ" and goal["goal_options"] == {} and goal["price_upper"] > 100
    assert ws_buy(shop, "goal-244", "wifi extender", "B09SWLPPVQ").score == 1.0
    assert get_reward(wifi, dict(goal, price_upper=90.0), 100.0, {})[0] == pytest.approx(2 / 3)
    # "wps button" is only in the (string) bullet text; "zigbee hub" is nowhere
    assert get_reward(wifi, dict(goal, attributes=["wps button"]), 100.0, {})[0] == 1.0
    assert get_reward(wifi, dict(goal, attributes=["zigbee hub"]), 100.0, {})[0] == pytest.approx(1 / 2)
    # price range: the checkout price is one draw inside it, under the goal's budget
    i = ws_goal_index(shop, "B08ZRR3DZT", color="black", size="large")
    assert shop.goals[i]["price_upper"] > shop.prices["B08ZRR3DZT"]
    assert ws_buy(shop, f"goal-{i}", "women's dresses", "B08ZRR3DZT", ["black", "large"]).score == 1.0


# ---- demonstrations, human goals, speed -------------------------------------------------------------


def test_expert_demos(shop):
    for task in ["goal-0", "goal-4", "goal-6", "goal-105", "goal-244"]:
        actions = shop.demo(task)
        assert actions[0] == f"search[{shop.goals[int(task[5:])]['query']}]" and actions[-1] == "click[buy now]"
        st = shop.reset(task)
        for a in actions:
            st = shop.step(a)
        assert st.done and st.success and st.score == 1.0
    assert shop.demo("goal-8") is None  # "wearable technology" matches no word of that product
    shop.reset("goal-0")
    shop.step("search[men's sweaters]")
    before = shop.step("click[next >]").observation
    shop.demo("goal-4")  # a demo leaves the episode in progress alone
    assert shop.step("click[< prev]").observation != before and shop.s["pageno"] == 1
    shares = {}
    for split in shop.splits:
        tasks = shop.tasks(split)
        shares[split] = sum(shop.demo(t) is not None for t in tasks) / len(tasks)
        print(f"webshop expert demos reaching reward 1.0: {split} {shares[split]:.3f} of {len(tasks)}")
    # 21 of the 251 goals cannot reach 1.0 (their colours, see test_synthetic_goal_colours_...), 1-2 are not found
    assert shares["test"] >= 0.85 and shares["train"] >= 0.85


def test_human_goals(tmp_path):
    for name in ["items_shuffle_mini.json", "items_ins_v2_mini.json"]:
        shutil.copy(os.path.join(WS_SLICE, name), tmp_path / name)
    human = {"B01LM6W7Z6": [
        {"instruction": "i want a 4 shelves acrylic organizer for nail polish.",
         "instruction_attributes": ["nail polish"], "instruction_options": ["4 shelves"]},
        {"instruction": "no attributes: skipped", "instruction_attributes": [], "instruction_options": []},
    ]}
    (tmp_path / "items_human_ins.json").write_text(json.dumps(human))
    shop = WebShop(str(tmp_path))
    assert shop.human_goals and len(shop.goals) == 1 and shop.goals[0]["weight"] == 1.0
    text = shop.goals[0]["instruction_text"]
    assert text.startswith("i want a 4 shelves acrylic organizer for nail polish, and price lower than ")
    assert shop.demo("goal-0")[-2:] == ["click[4 shelves]", "click[buy now]"]
    assert len(WebShop(str(tmp_path), human_goals=False).goals) == 251  # the synthetic goals instead


def test_speed(shop):
    t0 = time.perf_counter()
    for i in range(50):
        shop.reset(f"goal-{i}")
    t_reset = (time.perf_counter() - t0) / 50
    actions, n, t0 = ["search[men's sweaters]", "click[next >]", "click[< prev]", "click[b01ki9hu1o]", "click[small]",
                      "click[description]", "click[< prev]", "click[buy now]"], 0, time.perf_counter()
    for _ in range(20):
        shop.reset("goal-0")
        for a in actions:
            shop.step(a)
            n += 1
    t_step = (time.perf_counter() - t0) / n
    print(f"webshop reset {t_reset * 1e3:.2f} ms, step {t_step * 1e3:.2f} ms (mean over {n}, incl. search and reward)")
    assert t_reset < 0.01 and t_step < 0.05


def test_spacy_used_when_installed(monkeypatch):
    """With spaCy and a model present, only its NOUN/PROPN tokens count as title nouns."""
    import sys
    import types

    class Tok:
        def __init__(self, text, pos):
            self.text, self.pos_ = text, pos

    def nlp(title):
        return [Tok(w, "ADJ" if w == "Red" else "NOUN") for w in title.split()]

    util = types.SimpleNamespace(is_package=lambda m: m == "en_core_web_sm")
    fake = types.SimpleNamespace(load=lambda m: nlp, util=util)
    monkeypatch.setitem(sys.modules, "spacy", fake)
    monkeypatch.setattr(webshop, "_nlp", None)
    assert webshop.title_nouns("Red Wool Sweater Wool") == ["wool", "sweater", "wool"]
    loaded = []
    util.is_package = lambda m: True  # both models: the original's goal.py loads en_core_web_sm
    fake.load = lambda m: loaded.append(m) or nlp
    monkeypatch.setattr(webshop, "_nlp", None)
    webshop.title_nouns("Red Wool Sweater")
    assert loaded == ["en_core_web_sm"]
    monkeypatch.setattr(webshop, "_nlp", False)
    assert webshop.title_nouns("Red Wool Sweater") == ["red", "wool", "sweater"]  # the fallback keeps adjectives
