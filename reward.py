"""Rewards, prompts and data for the four reasoning tasks of the paper (section 5).

Public contract:
    TASKS                                    ("countdown", "gsm8k", "math500", "sudoku")
    reward(task, completion, example)        shaped training reward = format + correct
    reward_parts(task, completion, example)  {"format": ..., "correct": ...}
    is_correct(task, completion, example)    evaluation score in [0, 1] (correct / 3)
    prompt_messages(task, example)           [system message, user message]
    load_examples(task, split, source, n=None, seed=0)
                                             example dicts from the Hugging Face Hub
                                             ("hub") or offline generators ("synthetic")
    DataUnavailable                          raised when Hub data cannot be loaded
    solve_countdown, count_sudoku_solutions  brute-force checkers for the generators

Example dicts all carry "question" (the user message) plus
    countdown: "nums" (list of 3 ints), "target" (int)
    gsm8k, math500: "answer" (reference string)
    sudoku: "puzzle", "answer" (16-digit row-major strings, 0 = empty cell)

Completions are untrusted model text. Only their last TAIL_CHARS characters are read;
the answer is the text between the last "</answer>" and the "<answer>" before it (tags
are case-insensitive) and an answer longer than MAX_ANSWER_CHARS counts as missing.
Countdown expressions are checked character by character before `ast` parses them and
are evaluated exactly with Fraction. Every scoring call returns a finite float.
"""
import ast
import itertools
import operator
import random
import re
from fractions import Fraction

TASKS = ("countdown", "gsm8k", "math500", "sudoku")
SYNTHETIC_TASKS = ("countdown", "sudoku")

TAIL_CHARS = 20_000
MAX_ANSWER_CHARS = 1_000
MAX_EXPR_CHARS = 200  # also keeps parenthesis nesting far below the parser's limit
MAX_LITERAL_DIGITS = 6
MAX_NUMBER_CHARS = 50  # longest decimal compared exactly in math answers

SYNTHETIC_TRAIN_SIZE = 20_000
SYNTHETIC_TEST_SIZE = 256  # stands in for the 256-problem test sets of the paper

CD3_TEST_URL = ("https://raw.githubusercontent.com/dllm-reasoning/d1/"
                "6f5abf5ca8a58c6e08bbf06d412ad260dca6dbd3/dataset/countdown_cd3_test.jsonl")
# The sudoku splits of SPG (disjoint solution grids); the authors ship a copy of the test split.
SUDOKU_URLS = {
    "train": ("https://raw.githubusercontent.com/facebookresearch/SPG/"
              "2f9229cd516ac70ba031bf37a85badc33621333a/dataset/train_sudoku_split_new.csv"),
    "test": ("https://raw.githubusercontent.com/probablyabot/agrpo/"
             "837b292d08410e2e689b7820bd659ece5744b40b/test_sudoku_split_new.csv"),
}

_DIGITS = "0123456789"
_EXPR_CHARS = frozenset(_DIGITS + "+-*/() \t\r\n")
_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
_AST_OPS = {ast.Add: operator.add, ast.Sub: operator.sub,
            ast.Mult: operator.mul, ast.Div: operator.truediv}

_THINK = "Reason inside <think>...</think>, then give the final result in <answer>...</answer>."
_BOXED = " Put only the final answer in \\boxed{} inside the answer tags."
SYSTEM_PROMPTS = {
    "countdown": ("Reach the target by combining the numbers with + - * / and parentheses, "
                  "using each number exactly once. " + _THINK
                  + " Write the answer as: expression = target"),
    "gsm8k": _THINK + _BOXED,
    "math500": _THINK + _BOXED,
    "sudoku": ("Solve the 4x4 sudoku: each row, column and 2x2 box holds 1-4 once. "
               "A grid is 16 digits, row by row, 0 = empty. " + _THINK
               + " The answer is the full 16-digit grid."),
}


class DataUnavailable(RuntimeError):
    """The requested data could not be loaded (no network, missing dataset or library)."""


def _check_task(task):
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of: {', '.join(TASKS)}")


# ---------------------------------------------------------------- completion parsing

def _tags(completion):
    """(has a <think>...</think> block, answer text or None) from the completion's tail."""
    tail = completion[-TAIL_CHARS:]
    low = tail.lower()
    if len(low) != len(tail):  # a few non-ASCII letters change length when lowered
        low = tail
    opened = low.find("<think>")
    has_think = opened >= 0 and low.find("</think>", opened) >= 0
    end = low.rfind("</answer>")
    start = low.rfind("<answer>", 0, end) if end >= 0 else -1
    if start < 0:
        return has_think, None
    answer = tail[start + len("<answer>"):end].strip()
    return has_think, (answer if len(answer) <= MAX_ANSWER_CHARS else None)


# ---------------------------------------------------------------- countdown

def _literals(expr):
    """The integers written in expr (ASCII digits only), or None if one is too long."""
    runs = re.findall(r"[0-9]+", expr)
    if any(len(run) > MAX_LITERAL_DIGITS for run in runs):
        return None
    return [int(run) for run in runs]


def _fold(node):
    """Exact value of an arithmetic AST (ints, + - * /, unary +/-), None for anything else."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _fold(node.operand)
        if value is None or isinstance(node.op, ast.UAdd):
            return value
        return -value
    if isinstance(node, ast.BinOp) and type(node.op) in _AST_OPS:
        left, right = _fold(node.left), _fold(node.right)
        if left is None or right is None:
            return None
        return _AST_OPS[type(node.op)](left, right)
    return None


def _exact_value(expr):
    """Exact value of a short arithmetic expression, or None (bad syntax, x/0, too long)."""
    if len(expr) > MAX_EXPR_CHARS or not set(expr) <= _EXPR_CHARS:
        return None
    try:
        return _fold(ast.parse(expr, mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError, MemoryError):
        return None


def _countdown_parts(answer, example):
    """Format: 1/3 per check (right side is the target, left side uses only the allowed
    characters, left side uses exactly the given numbers), -0.5 for more than one '='.
    Correct: 3.0 if the left side passes the last two checks and equals the target."""
    if answer is None or "=" not in answer:
        return 0.0, 0.0
    sides = answer.split("=")
    lhs, rhs = sides[0].strip(), sides[-1].strip()
    used = _literals(lhs)
    rhs_ok = 0 < len(rhs) <= MAX_LITERAL_DIGITS and set(rhs) <= set(_DIGITS)
    checks = (
        rhs_ok and int(rhs) == example["target"],
        bool(lhs) and set(lhs) <= _EXPR_CHARS,
        used is not None and sorted(used) == sorted(example["nums"]),
    )
    fmt = sum(checks) / 3 - (0.5 if len(sides) > 2 else 0.0)
    correct = checks[1] and checks[2] and _exact_value(lhs) == example["target"]
    return fmt, 3.0 * correct


def solve_countdown(nums, target):
    """An expression using each number once that equals target exactly, or None."""
    def search(items):  # items: (exact value, expression) pairs still to combine
        if len(items) == 1:
            return items[0][1] if items[0][0] == target else None
        for i, j in itertools.permutations(range(len(items)), 2):
            (x, ex), (y, ey) = items[i], items[j]
            rest = [item for k, item in enumerate(items) if k not in (i, j)]
            for op, fn in _OPS.items():
                if not (op == "/" and y == 0):
                    found = search(rest + [(fn(x, y), f"({ex} {op} {ey})")])
                    if found:
                        return found
        return None

    found = search([(Fraction(n), str(n)) for n in nums])
    return found[1:-1] if found and len(nums) > 1 else found


# ---------------------------------------------------------------- gsm8k and math500

_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_DROPPED = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\$", "$",
            "^{\\circ}", "^\\circ", "\\%", "%")
_THOUSANDS = re.compile(r"-?[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]+)?")
_DECIMAL = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)")
_RATIO = re.compile(r"([-+]?)(?:\\frac\{([0-9]+)\}\{([0-9]+)\}|([0-9]+)/([0-9]+))")


def _boxed(text):
    """Content of the last \\boxed{...} in text (braces matched), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 0
    for i in range(start + len("\\boxed"), len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + len("\\boxed{"):i]
    return None


def _normalise(answer):
    """Drop LaTeX decoration, spaces, a trailing '.' and thousands separators."""
    answer = _TEXT_WRAPPER.sub(r"\1", answer)
    answer = answer.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    for token in _DROPPED:
        answer = answer.replace(token, "")
    answer = re.sub(r"\\frac([0-9])([0-9])", r"\\frac{\1}{\2}", "".join(answer.split()))
    answer = answer.rstrip(".")
    return answer.replace(",", "") if _THOUSANDS.fullmatch(answer) else answer


def _number(text):
    """Exact value of a plain decimal or integer fraction (no exponents), or None."""
    if len(text) > MAX_NUMBER_CHARS:
        return None
    if _DECIMAL.fullmatch(text):
        return Fraction(text)
    match = _RATIO.fullmatch(text)
    if not match:
        return None
    numerator, denominator = int(match[2] or match[4]), int(match[3] or match[5])
    if denominator == 0:
        return None
    return Fraction(numerator, denominator) * (-1 if match[1] == "-" else 1)


def _math_match(task, candidate, reference):
    """Equal after normalisation, or equal as numbers. For gsm8k a candidate that is not
    a number (e.g. "18 dollars") is read as the last number it contains."""
    cand, ref = _normalise(candidate), _normalise(reference)
    if "=" in cand and "=" not in ref:  # "x = 5" against "5"
        cand = cand.rsplit("=", 1)[1]
    if cand == ref:
        return bool(ref)
    value = _number(cand)
    if value is None and task == "gsm8k":
        found = re.findall(r"-?[0-9]+(?:\.[0-9]+)?", cand.replace(",", ""))
        value = _number(found[-1]) if found else None
    return value is not None and value == _number(ref)


def _math_parts(task, has_think, answer, example):
    """Format: 0.5 for a think block + 0.5 for an answer block. Correct: 3.0 if the
    \\boxed{} content of the answer (the whole answer if it has none) matches."""
    fmt = 0.5 * has_think + 0.5 * (answer is not None)
    if answer is None:
        return fmt, 0.0
    candidate = _boxed(answer) if "\\boxed" in answer else answer
    return fmt, 3.0 * (candidate is not None and _math_match(task, candidate, example["answer"]))


# ---------------------------------------------------------------- sudoku

def _sudoku_parts(answer, example):
    """The grid is the answer with whitespace removed. Format (only for 16 characters):
    0.25, +0.25 if each digit 1-4 appears four times, +0.5 if it keeps every given.
    Correct: 3.0 x share of the puzzle's empty cells holding the solution's digit."""
    if answer is None:
        return 0.0, 0.0
    grid = "".join(answer.split())
    puzzle, solution = example["puzzle"], example["answer"]
    fmt = 0.0
    if len(grid) == 16:
        fmt = (0.25 + 0.25 * ("".join(sorted(grid)) == "1111222233334444")
               + 0.5 * all(p in ("0", g) for p, g in zip(puzzle, grid)))
    empty = [i for i, p in enumerate(puzzle) if p == "0"]
    if not empty:
        return fmt, 3.0 * (grid == solution)
    solved = sum(i < len(grid) and grid[i] == solution[i] for i in empty)
    return fmt, 3.0 * solved / len(empty)


_PEERS = [[j for j in range(16) if j != i and (
    j // 4 == i // 4 or j % 4 == i % 4 or (j // 8, j % 4 // 2) == (i // 8, i % 4 // 2))]
    for i in range(16)]


def _solutions(cells, limit, rng=None):
    """Up to `limit` completions of a grid (list of 16 ints, 0 = empty) by backtracking;
    with rng the digits are tried in random order. Assumes the givens do not clash."""
    if 0 not in cells:
        return ["".join(map(str, cells))]
    i = cells.index(0)
    digits = [d for d in (1, 2, 3, 4) if all(cells[j] != d for j in _PEERS[i])]
    if rng is not None:
        rng.shuffle(digits)
    found = []
    for d in digits:
        cells[i] = d
        found += _solutions(cells, limit - len(found), rng)
        if len(found) >= limit:
            break
    cells[i] = 0
    return found


def count_sudoku_solutions(puzzle, limit=2):
    """Number of solutions of a 16-digit 4x4 puzzle (0 = empty), counted up to limit."""
    if len(puzzle) != 16 or not set(puzzle) <= set("01234"):
        raise ValueError(f"a 4x4 puzzle is 16 digits 0-4, got {puzzle!r}")
    cells = [int(c) for c in puzzle]
    if any(c and any(cells[j] == c for j in _PEERS[i]) for i, c in enumerate(cells)):
        return 0
    return len(_solutions(cells, limit))


# ---------------------------------------------------------------- public scoring API

def reward_parts(task, completion, example):
    """The two summed parts of the training reward: {"format": ..., "correct": ...}."""
    _check_task(task)
    has_think, answer = _tags(completion)
    if task == "countdown":
        fmt, correct = _countdown_parts(answer, example)
    elif task == "sudoku":
        fmt, correct = _sudoku_parts(answer, example)
    else:
        fmt, correct = _math_parts(task, has_think, answer, example)
    return {"format": float(fmt), "correct": float(correct)}


def reward(task, completion, example):
    """Shaped training reward (the paper, section 5): format + correctness, at most 4."""
    parts = reward_parts(task, completion, example)
    return parts["format"] + parts["correct"]


def is_correct(task, completion, example):
    """Evaluation score in [0, 1]: 1/0, or for sudoku the share of empty cells solved."""
    return reward_parts(task, completion, example)["correct"] / 3.0


def prompt_messages(task, example):
    """Chat messages for one example: a short task instruction, then the problem."""
    _check_task(task)
    return [{"role": "system", "content": SYSTEM_PROMPTS[task]},
            {"role": "user", "content": example["question"]}]


# ---------------------------------------------------------------- data

def _countdown_example(nums, target):
    nums = [int(n) for n in nums]
    return {"question": f"Target: {target}\nNumbers: {nums}", "nums": nums, "target": int(target)}


def _sudoku_example(puzzle, solution):
    return {"question": f"Puzzle: {puzzle}", "puzzle": puzzle, "answer": solution}


def _random_countdown(rng):
    """Three numbers in 1..100 and the value (a positive integer <= 1000) of a random
    expression that uses each of them once, so every problem is solvable."""
    while True:
        a, b, c = (rng.randint(1, 100) for _ in range(3))
        op1, op2 = rng.choice("+-*/"), rng.choice("+-*/")
        try:
            if rng.random() < 0.5:
                value = _OPS[op2](_OPS[op1](Fraction(a), b), c)
            else:
                value = _OPS[op1](Fraction(a), _OPS[op2](Fraction(b), c))
        except ZeroDivisionError:
            continue
        if value.denominator == 1 and 1 <= value <= 1000:
            nums = [a, b, c]
            rng.shuffle(nums)
            return _countdown_example(nums, value)


def _random_sudoku(rng):
    """A random full grid, then cells blanked in random order while the solution stays
    unique, until 6-12 cells are empty (the range of the public 4x4 test split)."""
    solution = _solutions([0] * 16, 1, rng)[0]
    cells, target_empty = [int(c) for c in solution], rng.randint(6, 12)
    order = list(range(16))
    rng.shuffle(order)
    for i in order:
        if cells.count(0) == target_empty:
            break
        kept, cells[i] = cells[i], 0
        if len(_solutions(cells[:], 2)) != 1:
            cells[i] = kept
    return _sudoku_example("".join(map(str, cells)), solution)


_GENERATORS = {  # task: (generator, key identifying a problem)
    "countdown": (_random_countdown, lambda e: (tuple(sorted(e["nums"])), e["target"])),
    "sudoku": (_random_sudoku, lambda e: e["puzzle"]),
}


def _distinct(task, rng, count, exclude):
    make, key = _GENERATORS[task]
    examples, seen = [], set(exclude)
    while len(examples) < count:
        example = make(rng)
        if key(example) not in seen:
            seen.add(key(example))
            examples.append(example)
    return examples


def _synthetic(task, split, n, seed):
    """Seeded offline data. The test set is fixed (its own stream, independent of seed);
    the train stream depends on seed and skips every test problem."""
    if task not in SYNTHETIC_TASKS:
        raise DataUnavailable(f"there is no synthetic data for {task}: offline generators "
                              f"exist only for {' and '.join(SYNTHETIC_TASKS)}; use --data hub")
    test = _distinct(task, random.Random(f"{task}/test"), SYNTHETIC_TEST_SIZE, ())
    if split == "test":
        return test
    key = _GENERATORS[task][1]
    count = SYNTHETIC_TRAIN_SIZE if n is None else n
    return _distinct(task, random.Random(f"{task}/train/{seed}"), count, {key(e) for e in test})


def _fetch(task, path, **kwargs):
    """datasets.load_dataset(path, **kwargs) as a list of rows; failures -> DataUnavailable."""
    try:
        from datasets import load_dataset
        return list(load_dataset(path, **kwargs))
    except Exception as err:  # no network, offline mode, missing dataset or library
        source = kwargs.get("data_files") or f"{path} from the Hugging Face Hub"
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        fix = ("check the network or pass --data synthetic" if task in SYNTHETIC_TASKS
               else "check the network (this task has no synthetic data)")
        raise DataUnavailable(f"could not load {source} ({type(err).__name__}: {reason}); "
                              + fix) from err


def _hub(task, split):
    """The paper's data (section 5), with test problems removed from the train split."""
    if task == "countdown":
        test = [_countdown_example(row["input"].split(","), row["output"])
                for row in _fetch(task, "json", data_files=CD3_TEST_URL, split="train")]
        if split == "test":
            return test
        held_out = {tuple(sorted(e["nums"])) for e in test}
        rows = _fetch(task, "Jiayi-Pan/Countdown-Tasks-3to4", split="train[:20000]")
        return [_countdown_example(row["nums"], row["target"]) for row in rows
                if len(row["nums"]) == 3 and tuple(sorted(row["nums"])) not in held_out]
    if task == "gsm8k":
        rows = _fetch(task, "openai/gsm8k", name="main", split=split)
        return [{"question": row["question"], "answer": row["answer"].split("####")[-1].strip()}
                for row in rows]
    if task == "math500":
        test = [{"question": row["problem"], "answer": row["answer"]} for row in
                _fetch(task, "HuggingFaceH4/MATH-500", split="test")]
        if split == "test":
            return test
        held_out = {e["question"] for e in test}
        rows = _fetch(task, "qwedsacf/competition_math", split="train")
        examples = [{"question": row["problem"], "answer": _boxed(row["solution"])}
                    for row in rows if row["level"][-1:] in ("1", "2", "3", "4")]  # levels 1-4
        return [e for e in examples if e["answer"] and e["question"] not in held_out]
    rows = _fetch(task, "csv", data_files=SUDOKU_URLS[split], split="train")
    examples = [_sudoku_example(str(row["Puzzle"]).zfill(16), str(row["Solution"]))
                for row in rows]  # the csv loader reads puzzles as ints, dropping leading zeros
    return examples[:20_000] if split == "train" else examples


def load_examples(task, split, source, n=None, seed=0):
    """Examples of task for split "train" or "test" from source "hub" (the paper's data,
    through `datasets`) or "synthetic" (offline, seeded); the first n if n is given.
    Raises DataUnavailable when the data cannot be loaded."""
    _check_task(task)
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
    if source == "hub":
        examples = _hub(task, split)
    elif source == "synthetic":
        examples = _synthetic(task, split, n, seed)
    else:
        raise ValueError(f"unknown source {source!r}; expected 'hub' or 'synthetic'")
    return examples if n is None else examples[:n]
