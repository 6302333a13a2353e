import sqlite3

import torch

from server.store import Store


def test_register_authenticate_and_only_hashes_on_disk(tmp_path):
    store = Store(tmp_path)
    client_id, token = store.register({"memory_bytes": 1e9}, examples=100)
    assert store.authenticate(token) == client_id
    assert store.authenticate(token + "x") is None and store.authenticate("") is None
    store.close()
    raw = sqlite3.connect(tmp_path / "state.sqlite").execute("SELECT token_hash FROM clients").fetchone()[0]
    assert token not in raw and len(raw) == 64


def test_state_survives_a_restart(tmp_path):
    store = Store(tmp_path)
    client_id, token = store.register({"memory_bytes": 5e8}, examples=7)
    store.set_plan(client_id, {"split": 3})
    r = store.current_round()
    assert store.record_step(r, client_id, 0, 2.5)
    store.record_upload(r, client_id, {"0.q.A": torch.ones(2, 4)}, split=3, digest="abc")
    store.complete_round(r, {client_id: {"split": 4}})  # the participants' next plans, in the same transaction
    store.close()

    again = Store(tmp_path)
    assert again.authenticate(token) == client_id
    assert again.client(client_id).plan == {"split": 4} and again.client(client_id).examples == 7
    assert again.upload_of(r, client_id) == (3, "abc") and again.upload_of(r + 1, client_id) is None
    assert again.completed_rounds() == 1 and again.current_round() == r + 1
    assert torch.equal(again.uploads(r)[client_id]["0.q.A"], torch.ones(2, 4)) and again.uploaded(r) == [client_id]
    assert again.losses(r) == {client_id: 2.5}
    assert again.steps_trained() == 1
    newest, done = again.round_history(limit=5)
    assert (newest.number, newest.status, newest.steps, newest.mean_loss, newest.uploads) == (r + 1, "open", 0, None, 0)
    assert (done.number, done.status, done.steps, done.mean_loss, done.uploads) == (r, "complete", 1, 2.5, 1)
    assert done.started <= done.completed and newest.completed is None


def test_a_retried_step_is_recognised(tmp_path):
    store = Store(tmp_path)
    client_id, _ = store.register({}, examples=1)
    assert store.record_step(1, client_id, 4, 1.0) is True
    assert store.record_step(1, client_id, 4, 9.0) is False
    assert store.losses(1) == {client_id: 1.0}


def test_tensor_files_are_written_atomically(tmp_path):
    store = Store(tmp_path)
    path = store.save_tensors("deltas/merged.safetensors", {"w": torch.zeros(3)})
    assert path.is_file() and not list(path.parent.glob(".*.tmp"))
    assert torch.equal(store.load_tensors("deltas/merged.safetensors")["w"], torch.zeros(3))
    assert store.load_tensors("deltas/none.safetensors") is None
