"""The MoM reproduction experiments (mom-vs-vanilla, mom-two-phase, mom-routing) at quick
scale on the tiny prepared data: every arm for every seed, matched costs as named, shared
phase-1 models trained once, resumption that trains nothing, routing statistics."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from modformer.experiments import mom_routing, mom_two_phase, mom_vs_vanilla
from modformer.experiments.common import claim_out_dir, experiment_dir_name, run_experiment

SEEDS = [0, 1]


@pytest.fixture()
def mom_data(tiny_data_dir, monkeypatch):
    monkeypatch.setenv(mom_vs_vanilla.DATA_ENV, str(tiny_data_dir))
    return tiny_data_dir


def by_arm(payload: dict) -> dict[str, list[dict]]:
    arms: dict[str, list[dict]] = {}
    for r in payload["results"]:
        arms.setdefault(r["arm"], []).append(r)
    return arms


def test_share_map_runs_each_module_in_depth_order():
    assert mom_vs_vanilla.share_map(4, 9) == [0, 0, 0, 1, 1, 2, 2, 3, 3]
    assert mom_vs_vanilla.share_map(4, 4) == [0, 1, 2, 3]


def test_depth_module_is_the_depth_ordered_stacks_module():
    assert [mom_routing.depth_module(h, 4, 4) for h in range(4)] == [0, 1, 2, 3]
    assert [mom_routing.depth_module(h, 4, 6) for h in range(6)] == [0, 0, 1, 2, 2, 3]
    assert mom_routing.depth_module(0, 4, 1) == 0


def test_data_env_must_name_a_prepared_directory(tmp_path, monkeypatch):
    monkeypatch.setenv(mom_vs_vanilla.DATA_ENV, str(tmp_path))
    with pytest.raises(ValueError, match="not a prepared data directory"):
        mom_vs_vanilla.data_dir(tmp_path)


def test_mom_vs_vanilla_quick(mom_data, tmp_path, monkeypatch):
    out = tmp_path / experiment_dir_name("mom-vs-vanilla", "quick")  # where mom-routing looks
    payload = run_experiment("mom-vs-vanilla", out, SEEDS, "quick")
    arms = by_arm(payload)
    assert set(arms) == set(mom_vs_vanilla.ARM_ORDER)
    assert all(sorted(r["seed"] for r in rows) == SEEDS for rows in arms.values())
    s = mom_vs_vanilla.SCALES["quick"]
    for seed in SEEDS:
        row = {a: next(r for r in rows if r["seed"] == seed) for a, rows in arms.items()}
        base = row["vanilla_cont"]
        assert base["steps"] == s.phase2_steps
        # MoM adds only its routers; parameter sharing reuses the vanilla weights exactly.
        for arm in mom_vs_vanilla.MOM_ARMS:
            assert row[arm]["steps"] == base["steps"]
            assert row[arm]["train_tokens"] == base["train_tokens"]
            assert 0 < row[arm]["total_params"] / base["total_params"] - 1 < 0.05
            # Equal FLOPs: the vanilla arm's steps follow the MoM arm's FLOPs per token.
            flops = row[f"vanilla_flops_{arm}"]
            ratio = row[arm]["flops_per_token"] / base["flops_per_token"]
            assert flops["extra"]["flops_ratio"] == pytest.approx(ratio)
            assert flops["steps"] == max(1, round(s.phase2_steps * ratio))
            assert flops["total_params"] == base["total_params"]
        assert row["param_sharing"]["total_params"] == base["total_params"]
        assert row["param_sharing"]["flops_per_token"] > base["flops_per_token"]
        # MoM_E (H=1) is cheaper per token than vanilla, MoM_P (K2H6) dearer than MoM_I.
        assert row["mom_e"]["flops_per_token"] < base["flops_per_token"]
        assert row["mom_p"]["flops_per_token"] > row["mom_i"]["flops_per_token"]
    md = (out / "results.md").read_text()
    assert "| vanilla_cont | 2 |" in md and "| mom_p_lr_half | 2 |" in md
    stored = json.loads((out / "results.json").read_text())
    assert (
        stored["experiment"] == "mom-vs-vanilla"
        and "mom_p vs vanilla_cont" in stored["comparisons"]
    )

    # Resumed: every arm is stored, nothing trains again.
    def no_training(*args, **kwargs):
        raise AssertionError("a stored arm was trained again")

    real_training = mom_vs_vanilla.train_and_measure
    monkeypatch.setattr(mom_vs_vanilla, "train_and_measure", no_training)
    again = run_experiment("mom-vs-vanilla", out, SEEDS, "quick")
    assert again["results"] == payload["results"]

    # mom-routing reads these models (re-running mom-vs-vanilla, which trains nothing) and
    # trains its own arms.
    monkeypatch.setattr(mom_vs_vanilla, "train_and_measure", real_training)
    routing = run_experiment("mom-routing", tmp_path / "mom-routing", SEEDS, "quick")
    rows = routing["rows"]
    arms = [*mom_vs_vanilla.MOM_ARMS, *mom_routing.ROUTING_ARMS]
    assert sorted((r["arm"], r["seed"]) for r in rows) == sorted(
        (a, s) for a in arms for s in SEEDS
    )
    for r in rows:
        assert r["chance"] == pytest.approx(1 / 5)  # 4 modules + SKIP
        assert 0 <= r["diagonal_mass"] <= 1
        if r["K"] >= 2:  # K >= 2 distinct picks hold at most one SKIP: never all SKIP
            assert r["all_skip_rate"] == 0 and 0 <= r["skip_rate"] <= 1 / r["K"]
        else:  # one pick: a SKIP pick is an all-SKIP decision
            assert r["all_skip_rate"] == pytest.approx(r["skip_rate"])
    # The trained arms start from the same phase-1 models, with the balance loss where named.
    trained = {r["arm"] for r in routing["results"]}
    assert trained == {"mom_p", *mom_routing.ROUTING_ARMS}
    assert set(routing["comparisons"]) == {f"{a} vs mom_p" for a in mom_routing.ROUTING_ARMS}
    config = json.loads(
        (
            tmp_path
            / "mom-routing"
            / "runs"
            / "mom_k1_balance"
            / "seed_0"
            / "model"
            / "config.json"
        ).read_text()
    )
    assert config["K"] == 1 and config["balance_loss_weight"] == mom_routing.BALANCE_WEIGHT
    assert "depth-order diagonal mass" in (tmp_path / "mom-routing" / "results.md").read_text()


def test_mom_two_phase_quick(mom_data, tmp_path, monkeypatch):
    out = tmp_path / "mom-two-phase"
    # Seed 0's phase-1 model and two-phase MoM_P exist already (as mom-vs-vanilla leaves
    # them in the shared directory): the experiment must reuse them, not train them again.
    p1 = mom_vs_vanilla.phase1(out, "quick", 0)
    mom_vs_vanilla.mom_p_arm(out, "quick", 0, p1)
    trained = []
    for module in (mom_vs_vanilla, mom_two_phase):
        real = module.train_and_measure

        def spy(arm, *args, real=real, **kwargs):
            trained.append(arm)
            return real(arm, *args, **kwargs)

        monkeypatch.setattr(module, "train_and_measure", spy)
    payload = run_experiment("mom-two-phase", out, SEEDS, "quick")
    own = ["vanilla_all", "mom_scratch_p1", "mom_scratch_all"]
    assert sorted(trained) == sorted(
        [*own, *own, "vanilla_phase1", "mom_p", "mom_same", "mom_same"]
    )
    arms = by_arm(payload)
    assert set(arms) == set(mom_two_phase.ARM_ORDER)
    s = mom_vs_vanilla.SCALES["quick"]
    tokens = {a: {r["train_tokens"] for r in rows} for a, rows in arms.items()}
    all_tokens = (s.phase1_steps + s.phase2_steps) * s.batch_size * s.block_size
    for arm in ("vanilla_all", "mom_scratch_all", "two_phase", "mom_same"):
        assert tokens[arm] == {all_tokens}, arm
    p1_tokens = s.phase1_steps * s.batch_size * s.block_size
    assert tokens["mom_scratch_p1"] == tokens["vanilla_phase1"] == {p1_tokens}
    params = {a: rows[0]["total_params"] for a, rows in arms.items()}
    # From scratch and converted MoM_P have the same shape; MoM-same stores 1 of 4 modules.
    assert params["mom_scratch_all"] == params["two_phase"]
    assert params["mom_same"] < params["vanilla_all"] < params["two_phase"]
    # The phase-1 models and mom_p live in the shared directory, not in this experiment's.
    shared = mom_vs_vanilla.shared_dir(out, "quick")
    assert (shared / "arms" / "phase1" / "seed_1.json").is_file()
    assert (shared / "arms" / "mom_p" / "seed_1.json").is_file()
    md = (out / "results.md").read_text()
    assert "(1) vs (2)" in md and "| mom_same | 2 |" in md


def test_grad_spikes_counts_norms_far_above_the_running_median():
    from modformer.experiments.mom_kxh import grad_spikes

    norms = [1.0] * 30
    norms[10], norms[25] = 5.5, 4.9  # 5.5x the median: a spike; 4.9x: not one
    result = grad_spikes(norms, factor=5.0, window=20)
    assert result["spikes"] == 1 and result["spike_steps"] == [11]
    assert result["max_norm_ratio"] == pytest.approx(5.5)
    # A slow rise is no spike: the running median follows it.
    assert grad_spikes([1.1**t for t in range(40)])["spikes"] == 0
    assert grad_spikes([1.0, 2.0])["max_norm_ratio"] is None  # too short to judge
    with pytest.raises(ValueError, match="factor > 1"):
        grad_spikes(norms, factor=1.0)


def test_mom_kxh_quick(mom_data, tmp_path, monkeypatch):
    from modformer.experiments import mom_kxh

    monkeypatch.setattr(mom_kxh, "GRID_K", (1, 3))  # the grid's corners, to stay fast
    monkeypatch.setattr(mom_kxh, "GRID_H", (1, 6))
    monkeypatch.setattr(mom_kxh, "GRID_SEEDS", 1)
    out = tmp_path / "mom-kxh"
    payload = run_experiment("mom-kxh", out, SEEDS, "quick")
    arms = by_arm(payload)
    grid = [mom_kxh.grid_arm(k, h) for k in mom_kxh.GRID_K for h in mom_kxh.GRID_H]
    assert set(arms) == {"vanilla_cont", *grid, *mom_kxh.ROUTER_ARMS}
    for arm in grid:  # the grid on the first seed only
        assert [r["seed"] for r in arms[arm]] == SEEDS[: mom_kxh.GRID_SEEDS]
    for arm in ("vanilla_cont", *mom_kxh.ROUTER_ARMS):
        assert sorted(r["seed"] for r in arms[arm]) == SEEDS
    steps = mom_vs_vanilla.SCALES["quick"].phase2_steps
    for rows in arms.values():
        for r in rows:  # every step's gradient norm logged, and the spikes judged on them
            norms = r["extra"]["grad_norms"]
            assert len(norms) == steps and all(n > 0 for n in norms)
            assert r["extra"]["spikes"] == mom_kxh.grad_spikes(norms)["spikes"]
    # FLOPs grow with K and with H; H = 1 is cheaper than the vanilla 4-layer chunk.
    flops = {a: rows[0]["flops_per_token"] for a, rows in arms.items()}
    assert flops["K1H1S"] < flops["vanilla_cont"]
    assert flops["K1H1S"] < flops["K1H6S"] and flops["K1H6S"] < flops["K3H6S"]
    # The router arms differ only in the router.
    gru, mlp = arms["router_gru"][0], arms["router_mlp"][0]
    assert gru["total_params"] != mlp["total_params"]
    md = (out / "results.md").read_text()
    assert "| K=3 |" in md and "| router_mlp | 2 |" in md
    assert "router_mlp vs router_gru" in payload["comparisons"]


def test_mom_redundancy_quick(mom_data, tmp_path):
    from modformer.experiments import mom_redundancy

    out = tmp_path / "mom-redundancy"
    payload = run_experiment("mom-redundancy", out, [0], "quick")
    arms = {a: rows[0] for a, rows in by_arm(payload).items()}
    assert set(arms) == set(mom_redundancy.ARM_ORDER)
    params = {a: r["total_params"] for a, r in arms.items()}
    # A removed module takes its parameters with it (and its router choice): an FFN holds
    # twice an attention module's weights, so dropping FFNs saves more.
    assert params["A1F4"] < params["A2F4"] < params["A4F4"]
    assert params["A4F1"] < params["A4F2"] < params["A4F4"]
    assert params["A4F1"] < params["A1F4"]
    for arm in ("A1F4", "A4F2"):  # K follows the pool: each router uses all its modules
        config = json.loads((out / "runs" / arm / "seed_0" / "model" / "config.json").read_text())
        n_attn, n_ffn = config["attn_modules_per_chunk"][0], config["ffn_modules_per_chunk"][0]
        assert (config["K_attn"], config["K_ffn"]) == (n_attn, n_ffn)
        assert f"A{n_attn}F{n_ffn}" == arm
    assert all(r["steps"] == mom_vs_vanilla.SCALES["quick"].phase2_steps for r in arms.values())
    md = (out / "results.md").read_text()
    assert "| A1F4 | 1 |" in md and "vs A4F4" in md


def test_mom_memory_matches_the_papers_shape(tmp_path):
    payload = run_experiment("mom-memory", tmp_path / "mom-memory", [0], "quick")
    paper = payload["paper"]
    assert len(paper) == 12 and [r["layers"] for r in paper[:4]] == [12, 6, 8, 16]
    # The paper's 12 figures are logits + 3 B*T*d per assembled attention layer (fp32,
    # 10 x 1024 tokens), to its two decimals plus rounding; ours (keys + values: 2 B*T*d)
    # moves less with depth, in the same direction.
    for r in paper:
        assert abs(r["paper_shape_fit"] - r["paper"]) < 0.025, r
        assert abs(r["ours_change"]) < abs(r["paper_change"]) or r["model"] == "GPT2"
        assert r["ours_change"] * r["paper_change"] >= 0
    assert all(r["measured_equals_formula"] for r in payload["ours"])
    assert (
        "| large | MoM_P K2H6S | 50 | 9.24" in (tmp_path / "mom-memory" / "results.md").read_text()
    )


def test_core_only_scale_trains_the_headline_arms(mom_data, tmp_path, monkeypatch):
    """The long scale's `core_only`: exp 1 keeps vanilla continued, MoM_P and vanilla at
    MoM_P's FLOPs; exp 2 vanilla for all steps, MoM_P from scratch and two-phase."""
    quick = mom_vs_vanilla.SCALES["quick"]
    monkeypatch.setitem(mom_vs_vanilla.SCALES, "quick", replace(quick, core_only=True))
    vs = run_experiment("mom-vs-vanilla", tmp_path / "a", [0], "quick")
    assert set(by_arm(vs)) == {"vanilla_cont", "mom_p", "vanilla_flops_mom_p"}
    md = (tmp_path / "a" / "results.md").read_text()
    assert "`mom_p`: equal tokens" in md and "`mom_e`" not in md  # only the arms it ran
    two = run_experiment("mom-two-phase", tmp_path / "b", [0], "quick")
    assert set(by_arm(two)) == {"vanilla_all", "mom_scratch_all", "vanilla_phase1", "two_phase"}


def test_out_dir_of_another_scale_or_experiment_is_refused(tmp_path):
    out = claim_out_dir(tmp_path / "x", "mom-vs-vanilla", "full")
    assert claim_out_dir(out, "mom-vs-vanilla", "full") == out  # the same: resumable
    with pytest.raises(ValueError, match="scale 'full', not 'mom-vs-vanilla' at 'long'"):
        run_experiment("mom-vs-vanilla", out, [0], "long")
    with pytest.raises(ValueError, match="another --out-dir"):
        claim_out_dir(out, "mom-two-phase", "full")
    assert experiment_dir_name("mom-vs-vanilla", "full") == "mom-vs-vanilla"
    assert experiment_dir_name("mom-vs-vanilla", "long") == "mom-vs-vanilla-long"
