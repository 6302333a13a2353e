import json

from app.cli import main


def test_finetune_cli_lowers_the_held_out_loss_and_writes_a_peft_adapter(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    # A learnable mapping for a byte-level tiny model: the completion repeats the prompt's word.
    words = ["alpha", "bravo", "delta", "gamma", "omega", "sigma", "kappa", "theta"]
    rows = [{"prompt": f"say {w}:", "completion": f" {w}"} for w in words for _ in range(5)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out, adapter = tmp_path / "report.json", tmp_path / "adapter"
    code = main([
        "finetune", "--model", "tiny-llama", "--data", str(data), "--ranks", "q=8,v=8,up=8,down=8",
        "--steps", "40", "--batch-size", "8", "--lr", "3e-2", "--alpha", "32", "--no-coco", "--generate-items", "4",
        "--save-adapter", str(adapter), "--out", str(out),
    ])
    assert code == 0
    report = json.loads(out.read_text())
    # A random 32-wide model starts at the uniform loss ln(258) = 5.55; 40 LoRA steps reach ~5.2.
    assert report["after"]["loss"] < report["before"]["loss"] - 0.2, (report["before"], report["after"])
    assert {"BLEU", "NIST"} <= report["after"].keys()
    assert (adapter / "adapter_model.safetensors").is_file()
    assert "| after |" in capsys.readouterr().out


def test_finetune_cli_reports_bad_data_without_a_traceback(tmp_path, caplog):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    assert main(["finetune", "--model", "tiny-llama", "--data", str(bad)]) == 2
    assert "line 1: 'completion' must be a non-empty string" in caplog.text
