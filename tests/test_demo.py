from hsplitlora.demo import DemoConfig, run_demo
from hsplitlora.finetune import EvalConfig


def test_demo_runs_a_real_server_and_client_processes_and_improves_the_model(e2e_dir):
    """Server + 2 client processes on 127.0.0.1 (tiny model): plans differ, the test loss falls."""
    result = run_demo(DemoConfig(model="tiny-llama", data=e2e_dir, clients=2, rounds=2, local_steps=2, max_len=400,
                                 eval=EvalConfig(loss_items=2, generate_items=2, max_new_tokens=8, coco=False)))
    clients = result["status"]["clients"]
    assert len(clients) == 2 and result["status"]["completed_rounds"] == 2
    assert len({c["split"] for c in clients}) == 2, clients  # a 4x budget spread gives different cuts
    assert sorted(result["rounds"]) == [1, 2] and all(len(v) == 2 for v in result["rounds"].values())
    assert result["after"]["loss"] < result["before"]["loss"]
