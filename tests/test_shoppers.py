"""The synthetic shop's one user model: the batch generator's history and the live
simulation's reactions come from the same shoppers, tastes, drift and choice model."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from shoprank.data import synthetic
from shoprank.data.synthetic import DAY_S, Shoppers, add_line, catalog_table, shop_model
from shoprank.data.validate import check_catalog, reason_counts, split_quarantine

SHOP = {"n_items": 300, "n_users": 150, "days": 5}


def test_shop_model_is_the_generators_catalog_and_users(tmp_path, monkeypatch):
    """shop_model(seed) rebuilds generate_shop's catalog row for row and its users' tastes:
    most of what each user clicks while browsing lies in their interest leaves, and the
    generator's engagement comes out of Shoppers.outcomes (the simulation's choice model)."""
    calls = []
    outcomes = Shoppers.outcomes

    def counted(self, *args, **kwargs):
        calls.append(len(args[2]))  # the items judged
        return outcomes(self, *args, **kwargs)

    monkeypatch.setattr(Shoppers, "outcomes", counted)
    summary = synthetic.generate_shop(tmp_path, seed=4, bad_fraction=0.0, **SHOP)
    assert calls == [summary["events_by_type"]["impression"]]  # every impression judged there

    shoppers = shop_model(seed=4, **SHOP)
    assert catalog_table(shoppers).equals(pq.read_table(tmp_path / "catalog.parquet"))
    events = pads.dataset(tmp_path / "events", partitioning="hive").to_table()
    clicks = events.filter(pc.and_(pc.equal(events["event"], "click"), pc.is_null(events["query"])))
    user = np.array([int(u[1:]) for u in clicks["user_id"].to_pylist()])
    row = {item: i for i, item in enumerate(shoppers.items["id"])}
    leaf = shoppers.items["leaf"][[row[i] for i in clicks["item_id"].to_pylist()]]
    in_interests = (shoppers.interest[user] == leaf[:, None]).any(axis=1).mean()
    other = shop_model(seed=5, **SHOP)  # another shop's users: their tastes do not explain it
    by_chance = (other.interest[user] == leaf[:, None]).any(axis=1).mean()
    assert in_interests > 0.75 and by_chance < 0.4


def test_react_follows_tastes_position_and_drift():
    shoppers = shop_model(seed=2, **SHOP)
    rng = np.random.default_rng(0)
    items = shoppers.items
    clicks_top = clicks_bottom = liked_clicks = random_clicks = 0
    for user in range(shoppers.n_users):
        session = shoppers.start_session(rng, user, 2.5 * DAY_S)
        liked = np.flatnonzero(items["leaf"] == session.focus)[:10]
        anything = rng.choice(len(items["leaf"]), size=10, replace=False)
        click, cart, buy = shoppers.react(session, liked, rng)
        assert not (cart & ~click).any() and not (buy & ~cart).any()  # the funnel
        clicks_top += click[: len(click) // 2].sum()
        clicks_bottom += click[len(click) // 2 :].sum()
        liked_clicks += click.sum()
        random_clicks += shoppers.react(session, anything, rng)[0].sum()
    assert liked_clicks > 1.5 * random_clicks  # the session's leaf is what they want
    assert clicks_top > clicks_bottom  # position bias

    # Drift: the fourth leaf takes over from the third around each user's drift time.
    users = np.arange(shoppers.n_users)
    before = shoppers.interest_weights(users, shoppers.ramp(users, shoppers.drift_t - 3 * DAY_S))
    after = shoppers.interest_weights(users, shoppers.ramp(users, shoppers.drift_t + 3 * DAY_S))
    assert (before[:, 3] < 0.1 * before[:, 2]).all() and (after[:, 2] < 0.1 * after[:, 3]).all()


def test_new_items_arrive_and_a_trend_grows():
    shoppers = shop_model(seed=3, **SHOP)
    grown = add_line(shoppers, "Novaline", 40, arrival_day=2.0, trend=(0.5, 1.0), seed=1)
    catalog = catalog_table(grown)
    good, bad = split_quarantine(check_catalog(catalog))
    assert good.num_rows == SHOP["n_items"] + 40 and reason_counts(bad) == {}
    assert set(catalog.slice(SHOP["n_items"])["brand"].to_pylist()) == {"Novaline"}
    assert catalog.slice(0, SHOP["n_items"]).equals(catalog_table(shoppers))  # old rows kept

    new = np.arange(SHOP["n_items"], SHOP["n_items"] + 40)
    rng = np.random.default_rng(0)
    session = grown.start_session(rng, 0, 1.5 * DAY_S)  # before the arrival
    assert (grown.relevance(session, new) == 0).all()
    assert not grown.react(session, new, rng)[0].any()
    early = grown.start_session(rng, 0, 2.1 * DAY_S)
    late = grown.start_session(rng, 0, 4.0 * DAY_S)
    late.focus, late.ramp = early.focus, early.ramp  # the same visit, two days later
    assert (grown.relevance(late, new) > grown.relevance(early, new)).all()  # the trend
    # The shop's own items are judged as before the line arrived.
    old = np.arange(50)
    assert np.allclose(grown.relevance(early, old), shoppers.relevance(early, old))


def test_a_visit_after_one_shops_for_its_complements():
    """Complementary shopping: the visit after a tent's often wants a sleeping bag or a
    headlamp, in the live sessions and in the generated history alike (consecutive browsing
    visits of a user turn to the previous focus's complements far above chance)."""
    shoppers = shop_model(seed=6, **SHOP)
    names = [lf.path.split(" > ")[-1] for lf in shoppers.leaves]
    tent = names.index("Tents")
    wanted = {names.index("Sleeping Bags"), names.index("Headlamps")}
    rng = np.random.default_rng(0)
    after = [shoppers.start_session(rng, u % 150, DAY_S, after=tent).focus for u in range(600)]
    first = [shoppers.start_session(rng, u % 150, DAY_S).focus for u in range(600)]
    share = np.mean([f in wanted for f in after])
    assert share > synthetic.COMPLEMENT_SHARE * 0.8 and np.mean([f in wanted for f in first]) < 0.1

    rng = np.random.default_rng(1)
    _, sessions = synthetic._simulate(rng, shoppers.items, shoppers.leaves, 150, 5)
    focus = sessions["focus"]
    same_user = sessions["user"][1:] == sessions["user"][:-1]
    turned = (shoppers.complements[focus[:-1]] == focus[1:, None]).any(axis=1)[same_user]
    by_chance = (shoppers.complements[focus[:-1]] == np.roll(focus, 7)[1:, None]).any(axis=1)
    assert turned.mean() > 0.3 and by_chance[same_user].mean() < 0.15


def test_held_out_kinds_says_what_test_positives_are(tmp_path):
    """`held_out_kinds` on a generated shop: the funnel's repeats are counted with every
    positive kept, and the kinds of first engagements add up to every user."""
    synthetic.generate_shop(tmp_path, seed=1, **SHOP)
    kinds = synthetic.held_out_kinds(tmp_path)
    shares = [v for k, v in kinds.items() if k not in ("users", "repeat (all positives kept)")]
    assert kinds["users"] > 50 and abs(sum(shares) - 1.0) < 0.01
    assert kinds["repeat (all positives kept)"] > 0.2  # carts and purchases after clicks
    assert kinds["leaf in history"] > 0.4
    assert kinds["complement of newest"] + kinds["complement of older"] > 0.02
