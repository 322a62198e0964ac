"""dspark-eval's per-round summary and its paired comparison of drafters (benchmarks/eval_compare.py)."""

import json

import pytest
import torch

from dspark_sglang.benchmarks.eval_acceptance import RunRecords, main, summarize
from dspark_sglang.benchmarks.eval_compare import merge_results, paired_tau_difference, pooled_tau
from dspark_sglang.confidence import CalibrationRecords

GAMMA = 3


def records(accepted: list[int], prompts: list[int], num_prompts: int) -> RunRecords:
    n = len(accepted)
    return RunRecords([torch.zeros(GAMMA)] * n, accepted, [GAMMA] * n, prompts, num_prompts=num_prompts)


def test_summary_counts_per_position_and_per_prompt():
    # prompt 1 ended before its first round: it still has a (zero) entry
    summary = summarize(records([0, 2, 1, 3], [0, 0, 2, 2], num_prompts=3), GAMMA)
    assert summary["tau"] == pytest.approx(2.5)  # mean of 1, 3, 2, 4
    # position 1 reached 4 times, passed 3; position 2 reached 3, passed 2; position 3 reached 2, passed 1
    assert summary["conditional_acceptance"] == pytest.approx([3 / 4, 2 / 3, 1 / 2])
    assert summary["prompt_rounds"] == [2, 0, 2]
    assert summary["prompt_accepted"] == [2, 0, 4]
    # the pooled τ of the per-prompt counts is the summary's τ
    rounds, accepted = torch.tensor(summary["prompt_rounds"]), torch.tensor(summary["prompt_accepted"])
    assert float(pooled_tau(rounds[None], accepted[None])) == pytest.approx(summary["tau"])


def test_written_records_name_each_rounds_prompt(tmp_path):
    run = records([0, 2, 1, 3], [0, 0, 2, 2], num_prompts=3)
    run.tensors().save(tmp_path / "r.safetensors")  # as dspark-eval writes records_<name>_T<t>_<set>
    back = CalibrationRecords.load(tmp_path / "r.safetensors")
    assert back.prompt_ids.tolist() == [0, 0, 2, 2] and back.num_accepted.tolist() == [0, 2, 1, 3]
    odd = run.tensors(torch.tensor([False, False, True, True]))
    assert odd.prompt_ids.tolist() == [2, 2] and odd.num_accepted.tolist() == [1, 3]


def per_prompt(accepted_per_round: torch.Tensor) -> dict:  # [P, rounds] -> the summary's per-prompt counts
    return {"prompt_rounds": [accepted_per_round.shape[1]] * accepted_per_round.shape[0],
            "prompt_accepted": accepted_per_round.sum(1).tolist()}


def test_identical_drafters_differ_by_nothing():
    gen = torch.Generator().manual_seed(0)
    same = per_prompt(torch.randint(0, 4, (50, 20), generator=gen))
    row = paired_tau_difference(same, same, samples=500)
    assert row["diff"] == 0 and row["ci95"] == [0, 0] and row["p_not_better"] == 1.0


def test_a_better_drafter_is_detected_and_an_equal_one_is_not():
    gen = torch.Generator().manual_seed(1)
    base = torch.randint(0, 3, (50, 20), generator=gen)
    better = per_prompt(base + (torch.rand(50, 20, generator=gen) < 0.3))  # +0.3 accepted per round
    row = paired_tau_difference(better, per_prompt(base), samples=2000)
    assert row["diff"] == pytest.approx(0.3, abs=0.05)
    assert row["ci95"][0] > 0 and row["p_not_better"] < 0.01
    # negative control: an independent draw of the same distribution must not look better
    twin = per_prompt(torch.randint(0, 3, (50, 20), generator=gen))
    row = paired_tau_difference(twin, per_prompt(base), samples=2000)
    assert row["ci95"][0] < 0 < row["ci95"][1] and row["p_not_better"] > 0.025


def test_unpaired_inputs_are_refused():
    with pytest.raises(ValueError, match="same prompts"):
        paired_tau_difference(per_prompt(torch.ones(3, 2, dtype=torch.long)), per_prompt(torch.ones(4, 2, dtype=torch.long)))


def write_run(path, name, accepted, temperature="0", **overrides):
    args = {"sets": "gsm8k", "num_prompts": 2, "max_new_tokens": 32, "seed": 1, "scheduler": "verify-all",
            "fixed_len": None, "dtype": "float32", "target": None, **overrides}
    summary = summarize(records(accepted, [0, 0, 1, 1], num_prompts=2), GAMMA)
    path.write_text(json.dumps({"args": args, "results": {name: {temperature: {"gsm8k": summary}}}}))
    return path


def test_compare_merges_runs_and_writes_the_paired_rows(tmp_path):
    a = write_run(tmp_path / "a.json", "dspark", [2, 3, 1, 2])
    b = write_run(tmp_path / "b.json", "dflash", [0, 1, 0, 1])
    main(["--compare", str(a), str(b), "--out", str(tmp_path / "out"), "--bootstrap", "200"])
    out = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(out["results"]) == {"dspark", "dflash"}
    (row,) = out["paired"]
    assert (row["first"], row["second"], row["set"], row["prompts"]) == ("dspark", "dflash", "gsm8k", 2)
    assert row["diff"] == pytest.approx(1.5)  # τ 3.0 vs 1.5
    assert (tmp_path / "out" / "acceptance.png").stat().st_size > 0
    # the inputs by folder and name: a committed result names no machine's folders
    assert out["args"]["compare"] == [f"{tmp_path.name}/a.json", f"{tmp_path.name}/b.json"]


def test_compare_refuses_runs_of_different_prompts_and_duplicate_names(tmp_path):
    a = write_run(tmp_path / "a.json", "dspark", [2, 3, 1, 2])
    with pytest.raises(ValueError, match="num_prompts"):
        merge_results([a, write_run(tmp_path / "b.json", "dflash", [0, 1, 0, 1], num_prompts=3)])
    with pytest.raises(ValueError, match="more than one"):
        merge_results([a, write_run(tmp_path / "c.json", "dspark", [0, 1, 0, 1])])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SystemExit, match="not a dspark-eval results.json"):
        main(["--compare", str(tmp_path / "bad.json"), "--out", str(tmp_path / "o")])


def test_one_drafters_runs_at_different_temperatures_are_joined(tmp_path):
    greedy = write_run(tmp_path / "t0.json", "dspark", [2, 3, 1, 2])
    sampled = write_run(tmp_path / "t1.json", "dspark", [0, 1, 0, 1], temperature="1")
    merged, _ = merge_results([greedy, sampled])
    assert sorted(merged["dspark"]) == ["0", "1"]
    assert merged["dspark"]["0"]["gsm8k"]["tau"] == pytest.approx(3.0)
    assert merged["dspark"]["1"]["gsm8k"]["tau"] == pytest.approx(1.5)


def test_cli_needs_drafters_or_a_comparison():
    with pytest.raises(SystemExit):
        main([])
