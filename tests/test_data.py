import pytest
from datasets import Dataset

from nbhelpers import data
from nbhelpers.loading import load_tokenizer


def test_task_is_deterministic_and_splits_disjoint():
    a = data.make_task_dataset("sort", n_train=300, n_eval=40, seed=3)
    b = data.make_task_dataset("sort", n_train=300, n_eval=40, seed=3)
    assert a["train"].to_list() == b["train"].to_list() and a["eval"].to_list() == b["eval"].to_list()
    assert not set(a["train"]["input"]) & set(a["eval"]["input"])
    c = data.make_task_dataset("sort", n_train=300, n_eval=40, seed=4)
    assert c["train"]["input"] != a["train"]["input"]


@pytest.mark.parametrize("task", data.TASKS)
def test_task_answers_are_right(task):
    for row in data.make_task_rows(task, 50, seed=1):
        digits = [int(x) for x in row["input"].split()]
        expect = sorted(digits) if task == "sort" else list(reversed(digits))
        assert [int(x) for x in row["output"].split()] == expect


def test_unknown_task_lists_tasks():
    with pytest.raises(ValueError, match="reverse"):
        data.make_task_rows("add")


def test_missing_columns_names_found_and_expected():
    ds = Dataset.from_list([{"question": "q", "response": "r"}])
    with pytest.raises(ValueError) as err:
        data.format_dataset(ds, tokenizer=None)
    msg = str(err.value)
    assert "instruction" in msg and "output" in msg and "question" in msg and "response" in msg


@pytest.mark.parametrize("arch", ["llama", "gpt_oss"])
def test_response_only_labels(arch, tiny_llama, tiny_gpt_oss):
    tok = load_tokenizer(tiny_llama if arch == "llama" else tiny_gpt_oss)
    row = {"instruction": "Sort the digits in ascending order.", "input": "3 1 2", "output": "1 2 3"}
    ex = data.tokenize_example(tok, data.to_messages(row, system="Be brief."))
    prompt = data.prompt_text(tok, data.to_messages(row, system="Be brief."))
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert ex["labels"][:n_prompt] == [-100] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
    answer = tok.decode(ex["input_ids"][n_prompt:])
    assert data.parse_response(answer) == "1 2 3"
    assert answer.rstrip().endswith(tok.eos_token)  # ChatML adds a newline after <|im_end|>
    assert tok.decode(ex["input_ids"][:n_prompt]) == prompt
    shown = data.show_masked(tok, ex)
    assert shown.endswith(answer) and "Sort" not in shown


def test_format_dataset_drops_rows_without_answer_tokens(tiny_llama):
    tok = load_tokenizer(tiny_llama)
    ds = data.make_task_dataset("sort", n_train=5, n_eval=1)["train"]
    assert len(data.format_dataset(ds, tok, max_length=512)) == 5
    with pytest.raises(ValueError, match="max_length=8 cuts off the answer of all 5 rows"):
        data.format_dataset(ds, tok, max_length=8)


def test_parse_response():
    assert data.parse_response("<|channel|>analysis<|message|>think<|end|><|start|>assistant<|channel|>final"
                               "<|message|> 1 2 3<|return|>") == "1 2 3"
    assert data.parse_response("1 2 3<|im_end|><|endoftext|><|endoftext|>") == "1 2 3"


def test_synthetic_dataset_by_name():
    ds = data.load_sft_dataset("synthetic:reverse", n_train=20, n_eval=5)
    assert len(ds["train"]) == 20 and len(ds["eval"]) == 5
