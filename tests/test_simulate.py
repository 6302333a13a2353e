import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from hsplitlora.aggregation import exact_update, ClientUpdate
from app.cli import main
from hsplitlora.finetune import EvalConfig
from hsplitlora.lora import lora_layer
from hsplitlora.federation.strategies import METHODS
from hsplitlora.simulate import Federation, SimConfig, simulate


def _cfg(e2e_dir, method="hsplitlora", **kw):
    base = dict(method=method, model="tiny-llama", data=e2e_dir, clients=3, rounds=2, local_steps=2,
                max_len=400, val_pairs=8, eval=EvalConfig(loss_items=2, generate_items=2, max_new_tokens=8, coco=False))
    base.update(kw)
    return SimConfig(**base)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_and_reports_rounds_plans_and_traffic(e2e_dir, method):
    results = simulate(_cfg(e2e_dir, method))
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    assert all(r["val_ppl"] > 1 and r["train_loss"] > 0 for r in results["rounds"])
    assert {"loss", "ppl", "BLEU", "NIST"} <= results["test"].keys()
    json.dumps(results)  # the results file must be plain JSON
    split_method = method in ("hsplitlora", "splitlora")
    assert all((p["split"] is not None) == split_method for p in results["final_plans"])
    traffic = sum(r["bytes_up"] for r in results["rounds"])
    assert traffic > 0 if method != "cenlora" else traffic == 0


def test_hsplitlora_merges_exactly_the_weighted_sum_of_the_clients_updates(e2e_dir):
    fed = Federation(_cfg(e2e_dir, local_steps=3))
    for c in fed.clients:
        fed._reset_adapters(c, None)
    for c in fed.clients:
        fed._local_round(c, None)
    targets = sorted({t for c in fed.clients for t in c.factors})
    before = {t: lora_layer(fed.model, t).weight_slice(t.proj).detach().clone() for t in targets}
    want = {t: exact_update([ClientUpdate(c.name, c.factors[t].A.detach().clone(), c.factors[t].B.detach().clone(),
                                          c.factors[t].scale, float(len(c.data)))
                             for c in fed.clients if t in c.factors]).dense() for t in targets}
    fed._end_round(1, {})
    for t in targets:
        got = lora_layer(fed.model, t).weight_slice(t.proj) - before[t]
        assert torch.allclose(got, want[t], atol=1e-6), t
    # Fresh adapters after the merge: every client restarts from the merged model.
    assert all(float(f.B.detach().abs().max()) == 0 for c in fed.clients for f in c.factors.values())


def test_heterogeneous_budgets_give_different_plans_that_fit(e2e_dir):
    fed = Federation(_cfg(e2e_dir, model="tiny-gpt2", clients=4))
    for c in fed.clients:
        fed._reset_adapters(c, None)
    plans = [(c.plan.split, sum(c.plan.ranks.values())) for c in fed.clients]
    assert len(set(plans)) > 1, plans
    for c in fed.clients:
        assert c.plan.predicted_memory.total <= c.budget.memory_bytes
        assert all(t.layer < c.split for t in c.plan.ranks)
    assert fed.clients[-1].split >= fed.clients[0].split


def test_saved_merged_model_and_svd_adapter_reproduce_the_global_model(e2e_dir, tmp_path, text_batch):
    merged, adapter = tmp_path / "merged", tmp_path / "adapter"
    cfg = _cfg(e2e_dir)
    simulate(cfg, merged_dir=merged, adapter_dir=adapter, adapter_rank=64)  # >= every dim: exact SVD
    model = AutoModelForCausalLM.from_pretrained(merged)
    base = AutoModelForCausalLM.from_pretrained(json.loads((adapter / "adapter_config.json").read_text())
                                                ["base_model_name_or_path"])
    from transformers import AutoTokenizer
    ids, mask = text_batch(AutoTokenizer.from_pretrained(merged))
    want = model(input_ids=ids, attention_mask=mask).logits
    got = PeftModel.from_pretrained(base, adapter)(input_ids=ids, attention_mask=mask).logits
    assert (got - want).abs().max() <= 1e-4
    assert "Relative Frobenius error" in (adapter / "README.md").read_text()


def test_report_command_writes_a_table_and_a_plot(e2e_dir, tmp_path, capsys):
    files = []
    for method in ("hsplitlora", "hetlora"):
        out = tmp_path / f"{method}.json"
        assert main(["simulate", "--method", method, "--model", "tiny-llama", "--data", str(e2e_dir),
                     "--clients", "2", "--rounds", "1", "--local-steps", "1", "--max-len", "400", "--no-coco",
                     "--eval-items", "1", "--generate-items", "1", "--out", str(out)]) == 0
        files.append(str(out))
    capsys.readouterr()
    assert main(["report", *files, "--plot", str(tmp_path / "ppl.png")]) == 0
    text = capsys.readouterr().out
    assert "| hsplitlora |" in text and "| hetlora |" in text
    assert (tmp_path / "ppl.png").stat().st_size > 1000


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="--method"):
        SimConfig(method="fedsgd")
