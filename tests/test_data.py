import json

import pytest

from hsplitlora.data import (
    IGNORE, DataError, Example, collate, load_e2e_test, load_e2e_train, load_jsonl, shard,
)
from hsplitlora.models import byte_tokenizer


def test_e2e_dev_is_the_training_pool_with_the_agreed_prompt(e2e_dir):
    train = load_e2e_train(e2e_dir)
    assert len(train) == 4672
    assert train[0].prompt == "Meaning representation: name[Alimentum], area[city centre], familyFriendly[no]\nDescription:"
    assert train[0].completion.startswith(" There is a place") and train[0].group == "Alimentum"


def test_e2e_test_groups_all_references_by_mr_in_order(e2e_dir):
    items = load_e2e_test(e2e_dir)
    assert len(items) == 630 and sum(len(i.references) for i in items) == 4693
    assert items[0].prompt.startswith("Meaning representation: name[Blue Spice], eatType[coffee shop], area[city centre]")


def test_labels_cover_the_completion_and_eos_only():
    tok = byte_tokenizer()
    batch = collate(tok, [Example("ab:", " cd"), Example("a:", " c")], max_len=32)
    assert batch.input_ids.shape == (2, 7)  # 3 prompt + 3 completion + EOS
    assert batch.labels[0].tolist() == [IGNORE] * 3 + tok(" cd")["input_ids"] + [tok.eos_token_id]
    assert batch.attention_mask[1].tolist() == [1] * 5 + [0] * 2
    assert batch.labels[1, 5:].tolist() == [IGNORE, IGNORE]
    assert batch.target_tokens == 4 + 3


def test_over_long_example_is_cut_at_max_len_but_a_too_long_prompt_is_an_error():
    tok = byte_tokenizer()
    batch = collate(tok, [Example("p:", " " + "x" * 50)], max_len=10)
    assert batch.input_ids.shape == (1, 10)
    with pytest.raises(DataError, match="does not fit"):
        collate(tok, [Example("p" * 20, " x")], max_len=10)


def test_iid_shards_partition_the_data():
    examples = [Example(f"p{i}", f" c{i}", f"g{i % 7}") for i in range(103)]
    shards = shard(examples, 5, iid=True, seed=1)
    assert sorted(ex.prompt for s in shards for ex in s) == sorted(ex.prompt for ex in examples)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_non_iid_shards_keep_each_restaurant_on_one_client(e2e_dir):
    shards = shard(load_e2e_train(e2e_dir), 5, iid=False)
    owners = {}
    for i, s in enumerate(shards):
        for ex in s:
            assert owners.setdefault(ex.group, i) == i, f"{ex.group} is on clients {owners[ex.group]} and {i}"
    assert sum(map(len, shards)) == 4672 and min(map(len, shards)) > 4672 / 5 * 0.8


def test_more_shards_than_groups_is_refused():
    examples = [Example("p", " c", "only") for _ in range(10)]
    with pytest.raises(ValueError, match="groups"):
        shard(examples, 3, iid=False)


def test_jsonl_loader_reads_prompt_completion_and_group(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "q", "completion": " a", "group": "x"}) + "\n\n"
                    + json.dumps({"prompt": "q2", "completion": " b"}) + "\n")
    assert load_jsonl(path) == [Example("q", " a", "x"), Example("q2", " b", "")]


@pytest.mark.parametrize("content, message", [
    ("", "no examples"),
    ('{"prompt": "q", "completion": " a"}\n{"prompt": "q"\n', "line 2: not valid JSON"),
    ('{"prompt": "q"}\n', "line 1: 'completion' must be a non-empty string"),
    ('["q", "a"]\n', "line 1: expected a JSON object"),
    ('{"prompt": "q", "completion": "' + "a" * 5000 + '"}\n', "line 1: 'completion' is 5000 characters"),
])
def test_bad_jsonl_names_the_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as err:
        load_jsonl(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("content, message", [
    ("", "the file is empty"),
    ("mr,text\nx,y\n", "missing column"),
    ("mr,ref\n", "no data rows"),
    ('mr,ref\n"name[A]","ok"\n"name[B]",""\n', "row 3: empty 'ref'"),
    ('mr,ref\n"name[A]","' + "r" * 5000 + '"\n', "row 2: 'ref' is 5000 characters"),
])
def test_bad_e2e_csv_names_the_file_and_row(tmp_path, content, message):
    (tmp_path / "devset.csv").write_text(content)
    with pytest.raises(DataError, match=message) as err:
        load_e2e_train(tmp_path)
    assert "devset.csv" in str(err.value)


def test_missing_e2e_directory_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_e2e_train(tmp_path / "nowhere")
