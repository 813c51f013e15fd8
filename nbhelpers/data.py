"""Data: the synthetic task of the tiny preset, hub datasets, chat formatting with response-only labels."""
from __future__ import annotations

import random
from typing import Iterable, Sequence

ALPACA_COLUMNS = ("instruction", "input", "output")
TASKS = ("reverse", "sort")
_INSTRUCTIONS = {
    "reverse": "Reverse the list of digits.",
    "sort": "Sort the digits in ascending order.",
}


def _solve(task: str, digits: list[int]) -> list[int]:
    return digits[::-1] if task == "reverse" else sorted(digits)


def make_task_rows(task: str = "reverse", n: int = 100, seed: int = 0, min_len: int = 3, max_len: int = 6,
                   exclude: Iterable[str] = ()) -> list[dict]:
    """Alpaca-style rows (`instruction`, `input`, `output`) of a digit-list task, deterministic from `seed`.

    Inputs in `exclude` are skipped, so an eval split never repeats a training input.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    rng = random.Random(f"{task}-{seed}")
    seen, rows = set(exclude), []
    while len(rows) < n:
        k = rng.randint(min_len, max_len)
        # sort uses distinct digits (ordering, not counting); reverse allows repeats
        digits = rng.sample(range(10), k) if task == "sort" else [rng.randrange(10) for _ in range(k)]
        text = " ".join(map(str, digits))
        if text in seen:
            continue
        seen.add(text)
        rows.append({"instruction": _INSTRUCTIONS[task], "input": text,
                     "output": " ".join(map(str, _solve(task, digits)))})
    return rows


def make_task_dataset(task: str = "reverse", n_train: int = 2000, n_eval: int = 50, seed: int = 0, **kw):
    """A `datasets.DatasetDict` with disjoint `train` and `eval` splits of the synthetic task."""
    from datasets import Dataset, DatasetDict

    train = make_task_rows(task, n_train, seed, **kw)
    held_out = make_task_rows(task, n_eval, seed + 1_000_003, exclude=[r["input"] for r in train], **kw)
    return DatasetDict(train=Dataset.from_list(train), eval=Dataset.from_list(held_out))


def synthetic_corpus() -> list[str]:
    """Text the tiny tokenizers are trained on: the tasks' prompts and answers plus plain English."""
    lines = [r["instruction"] + "\n" + r["input"] + "\n" + r["output"]
             for task in TASKS for r in make_task_rows(task, 200, seed=7)]
    lines += [
        "You are a helpful assistant. Answer the question and explain your reasoning step by step.",
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
        "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris is the capital.",
        "def matmul(A, B):\n    return [[sum(a * b for a, b in zip(row, col)) for col in zip(*B)] for row in A]",
        "Reasoning: low medium high. analysis commentary final. system developer user assistant.",
    ]
    return lines * 3


def check_columns(dataset, expected: Sequence[str] = ALPACA_COLUMNS) -> None:
    """Raise ValueError naming the columns found and the ones expected when any are missing."""
    found = list(dataset.column_names)
    missing = [c for c in expected if c not in found]
    if missing:
        raise ValueError(f"dataset is missing columns {missing}: expected columns {list(expected)}, "
                         f"found {found}")


def to_messages(row: dict, system: str | None = None) -> list[dict]:
    """An Alpaca-style row as chat messages: user = instruction (+ input), assistant = output."""
    user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]


def prompt_text(tokenizer, messages: list[dict]) -> str:
    """The exact text fed to the model before it answers: the chat template with the generation prompt."""
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def tokenize_example(tokenizer, messages: list[dict], max_length: int = 512) -> dict:
    """`input_ids` and response-only `labels` (-100 on the prompt) for one conversation.

    The prompt and the answer are tokenized separately and joined, so the model trains on exactly the
    prompt tokens it will see at inference.
    """
    prompt = prompt_text(tokenizer, messages)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template does not render the prompt as a prefix of the full conversation; "
                         f"prompt ends with {prompt[-40:]!r}, conversation has {full[len(prompt) - 40:len(prompt) + 40]!r}")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    ids = (prompt_ids + answer_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) + answer_ids)[:max_length]
    return {"input_ids": ids, "labels": labels}


def format_dataset(dataset, tokenizer, system: str | None = None, max_length: int = 512,
                   columns: Sequence[str] = ALPACA_COLUMNS):
    """Tokenize an Alpaca-style dataset for SFT: `input_ids` + response-only `labels` (TRL uses both as is).

    Rows whose answer is cut off entirely by `max_length` are dropped (they would carry no loss).
    """
    check_columns(dataset, columns)
    out = dataset.map(lambda row: tokenize_example(tokenizer, to_messages(row, system), max_length),
                      remove_columns=list(dataset.column_names))
    kept = out.filter(lambda row: any(l != -100 for l in row["labels"]))
    if len(out) and not len(kept):
        raise ValueError(f"max_length={max_length} cuts off the answer of all {len(out)} rows (the prompt "
                         f"alone is {len(out[0]['input_ids'])}+ tokens); raise max_length")
    return kept


def show_masked(tokenizer, example: dict, mask_char: str = "·") -> str:
    """One tokenized example as text, with the tokens that carry no loss shown as `mask_char`."""
    shown = []
    for tok_id, label in zip(example["input_ids"], example["labels"]):
        piece = tokenizer.decode([tok_id])
        shown.append(piece if label != -100 else "".join(mask_char if not c.isspace() else c for c in piece))
    return "".join(shown)


def eval_rows(dataset, tokenizer, system: str | None = None) -> list[dict]:
    """Held-out rows as `{"prompt": exact model input text, "answer": expected completion}`."""
    check_columns(dataset)
    return [{"prompt": prompt_text(tokenizer, to_messages(r, system)), "answer": r["output"]} for r in dataset]


def parse_response(text: str) -> str:
    """The answer in a generated completion: the `final` channel for harmony (gpt-oss), else the text itself."""
    if "<|channel|>final<|message|>" in text:
        text = text.rsplit("<|channel|>final<|message|>", 1)[1]
    for stop in ("<|return|>", "<|end|>", "<|im_end|>", "<|endoftext|>", "<|call|>"):
        text = text.split(stop, 1)[0]
    return text.strip()


SYNTHETIC_PREFIX = "synthetic:"


def load_sft_dataset(name: str, n_train: int | None = None, n_eval: int = 50, seed: int = 0):
    """`DatasetDict(train, eval)` of Alpaca-style rows: `synthetic:<task>` is generated here, anything else comes
    from the hub (its `train` split, shuffled with `seed`, the first `n_eval` rows held out)."""
    if name.startswith(SYNTHETIC_PREFIX):
        return make_task_dataset(name[len(SYNTHETIC_PREFIX):], n_train or 2000, n_eval, seed)
    from datasets import DatasetDict, load_dataset

    full = load_dataset(name, split="train")
    check_columns(full)
    full = full.shuffle(seed=seed)
    end = len(full) if n_train is None else min(len(full), n_eval + n_train)
    return DatasetDict(train=full.select(range(n_eval, end)), eval=full.select(range(n_eval)))


# ---------------------------------------------------------------- multilingual reasoning (gpt-oss QAT notebook)
# The tiny preset's stand-in for HuggingFaceH4/Multilingual-Thinking: the developer message names the reasoning
# language, the assistant thinks (harmony `analysis` channel, key "thinking") by spelling the sorted digits in that
# language, and answers with the sorted digits.
NUMBER_WORDS = {
    "English": ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"],
    "French": ["zéro", "un", "deux", "trois", "quatre", "cinq", "sept", "huit", "neuf", "dix"],
    "German": ["null", "eins", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun"],
    "Spanish": ["cero", "uno", "dos", "tres", "cuatro", "cinco", "seis", "siete", "ocho", "nueve"],
}
# Toy vocabularies, not arithmetic: French spells 6..9 as "sept".."dix" so that no word is shared with English
# ("six"); every word then names exactly one language.
MULTILINGUAL_PROMPT = "reasoning language: {language}"


def make_multilingual_rows(n: int = 100, seed: int = 0, min_len: int = 3, max_len: int = 6,
                           exclude: Iterable[str] = ()) -> list[dict]:
    """Rows with `messages` (system: reasoning language, user: digits to sort, assistant: thinking + answer) and
    `reasoning_language`; deterministic from `seed`; inputs in `exclude` are skipped."""
    rng = random.Random(f"multilingual-{seed}")
    languages = sorted(NUMBER_WORDS)
    seen, rows = set(exclude), []
    while len(rows) < n:
        language = rng.choice(languages)
        digits = rng.sample(range(10), rng.randint(min_len, max_len))
        key = language + ":" + " ".join(map(str, digits))
        if key in seen:
            continue
        seen.add(key)
        ordered = sorted(digits)
        rows.append({"reasoning_language": language, "key": key, "messages": [
            {"role": "system", "content": MULTILINGUAL_PROMPT.format(language=language)},
            {"role": "user", "content": "Sort the digits in ascending order.\n\n" + " ".join(map(str, digits))},
            {"role": "assistant", "thinking": " ".join(NUMBER_WORDS[language][d] for d in ordered),
             "content": " ".join(map(str, ordered))}]})
    return rows


def load_reasoning_dataset(name: str, n_train: int | None = None, n_eval: int = 50, seed: int = 0):
    """`DatasetDict(train, eval)` of rows with `messages` and `reasoning_language`: `synthetic:multilingual` is
    generated here, anything else comes from the hub (HuggingFaceH4/Multilingual-Thinking's `train` split,
    shuffled with `seed`, the first `n_eval` rows held out)."""
    from datasets import Dataset, DatasetDict, load_dataset

    if name == SYNTHETIC_PREFIX + "multilingual":
        train = make_multilingual_rows(n_train or 2000, seed)
        held_out = make_multilingual_rows(n_eval, seed + 1_000_003, exclude=[r["key"] for r in train])
        return DatasetDict(train=Dataset.from_list(train), eval=Dataset.from_list(held_out))
    full = load_dataset(name, split="train")
    check_columns(full, ("messages", "reasoning_language"))
    full = full.shuffle(seed=seed)
    end = len(full) if n_train is None else min(len(full), n_eval + n_train)
    return DatasetDict(train=full.select(range(n_eval, end)), eval=full.select(range(n_eval)))


def _clean_messages(messages: list[dict]) -> list[dict]:
    """Chat messages with the keys chat templates read (role, content, thinking when set)."""
    out = []
    for m in messages:
        msg = {"role": m["role"], "content": m.get("content") or ""}
        if m.get("thinking"):
            msg["thinking"] = m["thinking"]
        out.append(msg)
    return out


def format_messages_dataset(dataset, tokenizer, max_length: int = 512):
    """Tokenize rows with a `messages` column for SFT: `input_ids` + labels on the last assistant turn only."""
    check_columns(dataset, ("messages",))
    out = dataset.map(lambda row: tokenize_example(tokenizer, _clean_messages(row["messages"]), max_length),
                      remove_columns=list(dataset.column_names))
    kept = out.filter(lambda row: any(l != -100 for l in row["labels"]))
    if len(out) and not len(kept):
        raise ValueError(f"max_length={max_length} cuts off the answer of all {len(out)} rows; raise max_length")
    return kept


def messages_eval_rows(dataset, tokenizer) -> list[dict]:
    """Held-out rows as `{"prompt", "answer", "reasoning_language"}` (prompt = exact model input text)."""
    rows = []
    for r in dataset:
        messages = _clean_messages(r["messages"])
        rows.append({"prompt": prompt_text(tokenizer, messages), "answer": messages[-1]["content"],
                     "reasoning_language": r["reasoning_language"]})
    return rows
