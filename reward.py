"""Rewards, prompts and data for the paper's four tasks: countdown, GSM8K, MATH-500, 4x4 sudoku.

Public contract:
    TASKS                                    ("countdown", "gsm8k", "math500", "sudoku")
    reward(task, completion, example)        shaped training reward = format + correct
    reward_parts(task, completion, example)  {"format", "correct", "answer": the answer judged}
    is_correct(task, completion, example)    evaluation score in [0, 1] (correct / CORRECT)
    reference(task, example)                 the reference answer as text, for audit rows
    prompt_messages(task, example)           [system prompt with worked examples, problem]
    load_examples(task, split, source, n=None, seed=0, gsm8k_test="platinum")
                                             examples from the Hugging Face Hub ("hub") or
                                             offline generators ("synthetic")
    GSM8K_TEST_SETS, DataUnavailable         the GSM8K test sets; raised when data is missing
    solve_countdown, count_sudoku_solutions  brute-force checkers for the generators

Example dicts all carry "question" (the user message) plus
    countdown: "nums" (list of 3 ints), "target" (int)
    gsm8k, math500: "answer" (reference string)
    sudoku: "puzzle", "answer" (16-digit row-major strings, 0 = empty cell)

A completion is read twice. The format reward reads only a closed <answer>...</answer> block,
so that training teaches the format; correctness reads the final answer where a careful human
grader finds it (`_final_answer`) and judges it as such a grader would, by hand-written rules.
Completions are untrusted: only their last TAIL_CHARS characters are read, every answer is
bounded in length before it is parsed, nothing is eval'ed (arithmetic goes through the small
parser `_value`), and every scoring call returns a finite float.
"""
import contextlib
import itertools
import logging
import math
import operator
import random
import re
from fractions import Fraction

TASKS = ("countdown", "gsm8k", "math500", "sudoku")
SYNTHETIC_TASKS = ("countdown", "sudoku")
GSM8K_TEST_SETS = ("platinum", "openai")  # madrylab/gsm8k-platinum (the authors'), openai/gsm8k

# The weights of the paper's shaped reward: a format part (at most 1), then correctness.
CORRECT = 3.0  # a correct answer; for sudoku, times the share of the empty cells solved
COUNTDOWN_CHECK = 1 / 3  # each of the three format checks that the answer block passes
COUNTDOWN_EXTRA_EQUALS = -0.5  # an answer block with more than one '='
THINK_BLOCK = 0.5  # gsm8k and math500: a closed <think> block
ANSWER_BLOCK = 0.5  # gsm8k and math500: a closed <answer> block
SUDOKU_LENGTH = 0.25  # an answer block of 16 characters, which can then earn the two below
SUDOKU_DIGITS = 0.25  # each digit 1-4 four times
SUDOKU_GIVENS = 0.5  # every given of the puzzle kept

TAIL_CHARS = 20_000
MAX_ANSWER_CHARS = 1_000
MAX_EXPR_CHARS = 200  # longest arithmetic parsed; also bounds the parser's recursion
MAX_LITERAL_DIGITS = 6
MAX_EXACT_BITS = 4096  # an exact power larger than this is computed in floats
MAX_SHOWN_CHARS = 200  # of the extracted answer in reward_parts

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
PROBE_SECONDS = 10  # a data source that does not answer within this is read from the cache alone

_EXPR_CHARS = frozenset("0123456789+-*/() \t\r\n")
_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


class DataUnavailable(RuntimeError):
    """The requested data could not be loaded (no network, missing dataset or library)."""


def _check_task(task):
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of: {', '.join(TASKS)}")


# ---------------------------------------------------------------- reading a completion

_END_OF_TURN = ("<|eot_id|>", "<|endoftext|>")
_EMPTY_BOX = re.compile(r"\\?boxed\{\s*\}")


def _lowered(tail):
    """tail.lower(), or tail itself where lowering changes the length (a few non-ASCII letters)."""
    low = tail.lower()
    return low if len(low) == len(tail) else tail


def _answer_block(tail, low):
    """Strict reading, for the format reward: the text between the last </answer> and the
    <answer> before it (tags case-insensitive), or None (no such block, or a block too long)."""
    end = low.rfind("</answer>")
    start = low.rfind("<answer>", 0, end) if end >= 0 else -1
    if start < 0:
        return None
    answer = tail[start + len("<answer>"):end].strip()
    return answer if len(answer) <= MAX_ANSWER_CHARS else None


def _boxed(text):
    """Content of the last \\boxed{...} in text (the backslash may be missing), up to its
    matching brace. A box cut off by the end of text (the only brace left open) runs to the
    end, less a stray '>' of a broken tag. None if text has no box."""
    start = text.rfind("boxed{")
    if start < 0:
        return None
    start += len("boxed{")
    depth = 1
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    if text.count("{") - text.count("}") != 1:
        return None
    return text[start:].rstrip().rstrip("<>/").rstrip()


def _final_answer(tail):
    """Careful reading, for correctness: the span of the last <answer> block (up to its
    </answer> or the end of the turn, whichever comes first); inside it, its last \\boxed{} if
    it has one. With no block, or an empty one, the last \\boxed{} of the whole tail. Empty
    boxes hold no answer. None if nothing is found, a box is broken, or the text is too long."""
    tail = _EMPTY_BOX.sub("", tail)
    low, span = _lowered(tail), ""
    start = low.rfind("<answer>")
    if start >= 0:
        start += len("<answer>")
        ends = [low.find(marker, start) for marker in ("</answer>",) + _END_OF_TURN]
        span = tail[start:min([end for end in ends if end >= 0], default=len(tail))].strip()
    if len(span) > MAX_ANSWER_CHARS:
        return None
    text = span or tail  # no block, or an empty one: a box anywhere
    answer = ((_boxed(text) if "boxed{" in text else span) or "").strip()
    return answer if answer and len(answer) <= MAX_ANSWER_CHARS else None


# ---------------------------------------------------------------- arithmetic written in LaTeX

_SPELLINGS = (("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\times", "*"), ("\\cdot", "*"),
              ("×", "*"), ("·", "*"), ("∗", "*"), ("\\div", "/"), ("÷", "/"), ("−", "-"),
              ("\\left", ""), ("\\right", ""), ("\\displaystyle", ""), ("\\!", ""), ("\\,", ""),
              ("\\;", ""), ("\\:", ""), ("\\ ", ""), ("\\(", ""), ("\\)", ""), ("\\[", ""),
              ("\\]", ""), ("\\$", ""), ("$", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("°", ""),
              ("\\%", ""), ("%", ""))  # one spelling per operation; spacing, $, %, degrees dropped
_TOKEN = re.compile(r"\\(?:frac|sqrt|pi)|[0-9]+(?:\.[0-9]*)?|\.[0-9]+|[a-zA-Z]|[-+*/^(){}]")
_IMPLICIT = ("(", "\\sqrt", "\\pi")  # 2(x+1), 2\sqrt{3}, 3\pi and 2x are products; 4{10} is 410


def _respell(text):
    for spelling, plain in _SPELLINGS:
        text = text.replace(spelling, plain)
    return text


def _value(text, exact=False):
    r"""Value of a short arithmetic expression in this grammar (spaces between tokens ignored):
        total   := product (("+" | "-") product)*
        product := power (("*" | "/") power | power)*    the bare power, an implicit product,
                                                           opens with "(", \sqrt, \pi or a letter
        power   := ("+" | "-") power | atom ("^" atom)?  |exponent| <= 64, whole if base < 0
        atom    := number ("\frac" atom atom)?            a number, or a mixed number 1\frac{4}{5}
                 | "(" total ")" | "{" total "}" | "\frac" atom atom | "\sqrt" atom | "\pi"
                 | letter
        number  := [0-9]+ ("." [0-9]*)? | "." [0-9]+
        letter  := [a-zA-Z]
    Letters stand for fixed numbers (see atom). A Fraction while the arithmetic is exact, else a
    float; None if text is no such expression. exact=True allows only integers, + - * /, \frac
    and brackets (countdown)."""
    tokens = _TOKEN.findall(text)
    if len(text) > MAX_EXPR_CHARS or "".join(tokens) != "".join(text.split()) or exact and any(
            t in ("^", "\\sqrt", "\\pi") or t.isalpha() or "." in t for t in tokens):
        return None
    tokens.append("")  # end marker
    pos = 0

    def take(expected=None):
        nonlocal pos
        pos += 1
        if expected is not None and tokens[pos - 1] != expected:
            raise ValueError(expected)
        return tokens[pos - 1]

    def total():
        value = product()
        while tokens[pos] in ("+", "-"):
            value = value + product() if take() == "+" else value - product()
        return value

    def product():
        value = power()
        while tokens[pos] in ("*", "/") + _IMPLICIT or tokens[pos].isalpha():
            op = take() if tokens[pos] in ("*", "/") else "*"
            value = value / power() if op == "/" else value * power()
        return value

    def power():
        if tokens[pos] in ("+", "-"):
            return -power() if take() == "-" else power()
        value = atom()
        if tokens[pos] != "^":
            return value
        take()
        exponent = atom()
        whole = exponent == int(exponent)
        if abs(exponent) > 64 or value < 0 and not whole:
            raise ValueError("exponent")
        if isinstance(value, Fraction) and (not whole or abs(exponent) * max(
                abs(value.numerator), value.denominator).bit_length() > MAX_EXACT_BITS):
            value = float(value)
        return value ** (int(exponent) if whole else float(exponent))

    def atom():
        token = take()
        if token[:1].isdigit() or token[:1] == ".":
            value = Fraction(token)
            return value + atom() if tokens[pos] == "\\frac" else value  # a mixed number
        if token in ("(", "{"):
            value = total()
            take(")" if token == "(" else "}")
            return value
        if token == "\\frac":
            return atom() / atom()
        if token == "\\sqrt":
            return math.sqrt(atom())
        if token == "\\pi":
            return math.pi
        if token.isalpha():
            # A letter is a fixed number, the log of its code point: distinct letters get distinct,
            # algebraically independent-looking values, so two expressions that agree at them are
            # very likely equal as expressions (2x+1 and 1+2x), as at a random test point.
            return math.log(ord(token))
        raise ValueError(token)

    try:
        value = total()
    except (ValueError, ZeroDivisionError, OverflowError, RecursionError, TypeError, IndexError):
        return None
    if pos != len(tokens) - 1 or isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---------------------------------------------------------------- countdown

def _literals(expr):
    """The integers written in expr (ASCII digits only), or None if one is too long."""
    runs = re.findall(r"[0-9]+", expr)
    if any(len(run) > MAX_LITERAL_DIGITS for run in runs):
        return None
    return [int(run) for run in runs]


def _countdown_format(block, example):
    """COUNTDOWN_CHECK per check on the strict answer block (right side is the target, left
    side uses only + - * / ( ) digits and spaces, left side uses exactly the given numbers),
    plus COUNTDOWN_EXTRA_EQUALS for more than one '='."""
    if block is None or "=" not in block:
        return 0.0
    sides = block.split("=")
    lhs, rhs = sides[0].strip(), sides[-1].strip()
    used = _literals(lhs)
    checks = (rhs.isascii() and rhs.isdigit() and len(rhs) <= MAX_LITERAL_DIGITS
              and int(rhs) == example["target"],
              bool(lhs) and set(lhs) <= _EXPR_CHARS,
              used is not None and sorted(used) == sorted(example["nums"]))
    return COUNTDOWN_CHECK * sum(checks) + (COUNTDOWN_EXTRA_EQUALS if len(sides) > 2 else 0.0)


def _countdown_correct(answer, example):
    """The expression alone, `expression = target` or a chain `a = b = target`, in ASCII,
    LaTeX or Unicode: correct when a side uses each given number exactly once and every side
    equals the target exactly. Parentheses left open at the end of a side are closed."""
    if answer is None or len(answer) > MAX_EXPR_CHARS:
        return False
    sides = [side.strip() + ")" * max(0, side.count("(") - side.count(")"))  # "28 + (11 - 5"
             for side in _respell(answer).strip().rstrip(".").split("=")]
    nums = sorted(example["nums"])
    return (any(sorted(_literals(side) or []) == nums for side in sides)
            and all(_value(side, exact=True) == example["target"] for side in sides))


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

_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\{([^{}]*)\}")
_UNIT = re.compile(r"(?<=[0-9}])\s+[a-zA-Z]{2,}(?:\s+[a-zA-Z]+)*(?:\^\{?[23]\}?)?\.?$")  # " cm^2"
_SHORT_FRACTION = re.compile(r"\\frac(\{[^{}]*\}|[0-9a-zA-Z])(\{[^{}]*\}|[0-9a-zA-Z])")
_THOUSANDS = re.compile(r"-?[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]+)?")
_VARIABLE = re.compile(r"[a-zA-Z](?:=|\\in)")  # the "x=" of "x=5", the "x\in" of "x\in[-2,7]"


def _canonical(answer):
    """One spelling for equal answers: a unit after a value and \\text{} wrappers dropped, one
    spelling per operation and no spacing (`_SPELLINGS`), short arguments braced (\\frac12,
    \\sqrt3), base subscripts unbraced, thousands separators removed, "(C)" -> "C", and a
    leading "x=" or "x \\in" removed."""
    answer = _UNIT.sub("", _TEXT_WRAPPER.sub(r" \1", answer.strip()))
    answer = "".join(_respell(answer).split()).rstrip(".")
    answer = re.sub(r"\\sqrt([0-9a-zA-Z])", r"\\sqrt{\1}", answer)
    answer = _SHORT_FRACTION.sub(lambda m: "\\frac" + "".join(  # \frac12 -> \frac{1}{2}
        a if a.startswith("{") else "{" + a + "}" for a in m.groups()), answer)
    answer = re.sub(r"_\{([0-9a-zA-Z]+)\}", r"_\1", answer)
    if _THOUSANDS.fullmatch(answer):
        answer = answer.replace(",", "")
    if re.fullmatch(r"\([A-Za-z]\)", answer):
        answer = answer[1]
    prefix = _VARIABLE.match(answer)
    return answer[prefix.end():] if prefix else answer


def _same_value(a, b):
    """Equal canonical strings, or equal values: exactly when both are exact, else to 1e-9."""
    if a == b:
        return bool(a)
    x, y = _value(a), _value(b)
    if x is None or y is None:
        return False
    if isinstance(x, Fraction) and isinstance(y, Fraction):
        return x == y
    try:
        return math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12)
    except OverflowError:  # an exact value too large for a float
        return False


def _split(text):
    """text split at its top-level commas, or None if its brackets do not balance."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += (char in "([{") - (char in ")]}")
        if depth < 0:
            return None
        if char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    return items + [text[start:]] if depth == 0 else None


def _enclosed(text):
    """(kind, items) of a tuple or interval "(a,b]" (kind: its brackets, items in order), a set
    "\\{a,b\\}" or a bare list "a,b" (kind "set", any order); ("", [text]) for anything else."""
    if text.startswith("\\{") and text.endswith("\\}"):
        kind, inner = "set", text[2:-2]
    elif len(text) > 1 and text[0] in "([" and text[-1] in ")]" and _split(text[1:-1]):
        kind, inner = text[0] + text[-1], text[1:-1]
    else:
        kind, inner = "set", text
    items = _split(inner)
    return (kind, items) if items and len(items) > 1 else ("", [text])


def _math_equal(task, answer, reference):
    """A careful grader's equivalence, by hand (no symbolic algebra): canonical strings, exact
    numbers, or numeric values; the last value of an = chain; tuples and intervals item by item,
    lists and sets in any order. For gsm8k an answer that is none of these is read as the last
    number it contains ("18 apples")."""
    if answer is None:
        return False
    cand, ref = _canonical(answer), _canonical(reference)
    if "=" in cand and "=" not in ref:
        cand = cand.rsplit("=", 1)[1]
    if re.fullmatch(r"[0-9A-Za-z]+_[0-9]+", ref) and "_" not in cand:  # 2516 for 2516_8
        ref = ref.split("_")[0]
    if _same_value(cand, ref):
        return True
    (cand_kind, cand_items), (ref_kind, ref_items) = _enclosed(cand), _enclosed(ref)
    if len(ref_items) > 1 and cand_kind == ref_kind and len(cand_items) == len(ref_items):
        if ref_kind != "set":
            return all(_same_value(c, r) for c, r in zip(cand_items, ref_items))
        unmatched = list(cand_items)
        for r in ref_items:
            match = next((c for c in unmatched if _same_value(c, r)), None)
            if match is None:
                return False
            unmatched.remove(match)
        return True
    if task == "gsm8k" and not isinstance(_value(cand), Fraction):
        found = re.findall(r"-?[0-9]+(?:\.[0-9]+)?", cand.replace(",", ""))
        return bool(found) and _value(found[-1]) == _value(ref)
    return False


# ---------------------------------------------------------------- sudoku

_SEPARATOR_LINE = re.compile(r"```\w*|[-+=_|\s]*")  # "+--+--+", "-----", a code fence


def _sudoku_format(block, example):
    """On the strict answer block, only when it is 16 characters: SUDOKU_LENGTH, + SUDOKU_DIGITS
    if each digit 1-4 appears four times, + SUDOKU_GIVENS if it keeps every given of the puzzle."""
    if block is None or len(block) != 16:
        return 0.0
    return (SUDOKU_LENGTH + SUDOKU_DIGITS * ("".join(sorted(block)) == "1111222233334444")
            + SUDOKU_GIVENS * all(p in ("0", g) for p, g in zip(example["puzzle"], block)))


def _sudoku_share(answer, example):
    """Share of the puzzle's empty cells that hold the solution's digit, for a whole grid: the
    answer's 16 digits once separator lines, code fences, whitespace, '|' and ',' are dropped.
    Anything else (15 or 17 digits, letters, part of a grid) is malformed and scores 0."""
    lines = [line for line in (answer or "").splitlines() if not _SEPARATOR_LINE.fullmatch(line)]
    grid, solution = re.sub(r"[\s|,]", "", "".join(lines)), example["answer"]
    if len(grid) != 16 or not (grid.isascii() and grid.isdigit()):
        return 0.0
    empty = [i for i, p in enumerate(example["puzzle"]) if p == "0"]
    if not empty:
        return float(grid == solution)
    return sum(grid[i] == solution[i] for i in empty) / len(empty)


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
    """The two summed parts of the shaped reward and the answer they judged:
    {"format": strict format score, "correct": 0 to CORRECT, "answer": final answer or None}."""
    _check_task(task)
    tail = completion[-TAIL_CHARS:]
    low = _lowered(tail)
    block, answer = _answer_block(tail, low), _final_answer(tail)
    if task == "countdown":
        fmt, correct = _countdown_format(block, example), float(_countdown_correct(answer, example))
    elif task == "sudoku":
        fmt, correct = _sudoku_format(block, example), _sudoku_share(answer, example)
    else:
        opened = low.find("<think>")
        fmt = (THINK_BLOCK * (opened >= 0 and low.find("</think>", opened) >= 0)
               + ANSWER_BLOCK * (block is not None))
        correct = float(_math_equal(task, answer, example["answer"]))
    return {"format": float(fmt), "correct": CORRECT * correct,
            "answer": None if answer is None else answer[:MAX_SHOWN_CHARS]}


def reward(task, completion, example):
    """Shaped training reward of the paper: format + correctness, at most 4."""
    parts = reward_parts(task, completion, example)
    return parts["format"] + parts["correct"]


def is_correct(task, completion, example):
    """Evaluation score in [0, 1]: 1/0, or for sudoku the share of empty cells solved."""
    return reward_parts(task, completion, example)["correct"] / CORRECT


def reference(task, example):
    """The reference answer as text, for an audit row beside the extracted answer."""
    _check_task(task)
    if task == "countdown":
        return f"{example['target']} from {example['nums']}"
    return str(example["answer"])


def prompt_messages(task, example):
    """Chat messages for one example: the task's system prompt (format and worked examples),
    then the problem."""
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


def _answers(path, data_files):
    """Whether the source of load_dataset(path, data_files=...), the data files' URL or else the
    data set's page on the Hub, answers one HEAD request within PROBE_SECONDS (any HTTP status)."""
    import huggingface_hub
    url = data_files or f"{huggingface_hub.constants.ENDPOINT}/datasets/{path}"
    try:
        huggingface_hub.get_session().head(url, timeout=PROBE_SECONDS)
    except Exception as err:  # no network or name resolution, a timeout, huggingface_hub offline
        return getattr(err, "response", None) is not None
    return True


@contextlib.contextmanager
def _quiet(datasets, offline):
    """For the with block: datasets and huggingface_hub log errors only and, if offline, datasets
    is in its offline mode (reads its local cache alone, as HF_DATASETS_OFFLINE=1 makes it)."""
    loggers = [logging.getLogger(name) for name in ("datasets", "huggingface_hub")]
    levels, was_offline = [logger.level for logger in loggers], datasets.config.HF_HUB_OFFLINE
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    datasets.config.HF_HUB_OFFLINE = offline
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        datasets.config.HF_HUB_OFFLINE = was_offline


def _fetch(task, path, **kwargs):
    """datasets.load_dataset(path, **kwargs) as a list of rows, quietly. A source that does not
    answer one quick request is read from the local cache alone, at once rather than after a
    minute of retries. Failures -> DataUnavailable, one sentence."""
    source, offline = kwargs.get("data_files") or f"{path} from the Hugging Face Hub", False
    try:
        import datasets
        offline = datasets.config.HF_HUB_OFFLINE or not _answers(path, kwargs.get("data_files"))
        with _quiet(datasets, offline):
            return list(datasets.load_dataset(path, **kwargs))
    except Exception as err:  # no datasets library, a missing data set, offline and not cached
        reason = ("offline, and no usable copy in the local cache" if offline else
                  f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}")
        fix = ("check the network or pass --data synthetic" if task in SYNTHETIC_TASKS
               else "check the network (this task has no synthetic data)")
        raise DataUnavailable(f"could not load {source} ({reason}); {fix}") from err


def _hub(task, split, gsm8k_test):
    """The paper's data, with test problems removed from the train split."""
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
        platinum = (split, gsm8k_test) == ("test", "platinum")  # the label errors fixed
        rows = _fetch(task, "madrylab/gsm8k-platinum" if platinum else "openai/gsm8k",
                      name="main", split=split)
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


def load_examples(task, split, source, n=None, seed=0, gsm8k_test="platinum"):
    """Examples of task for split "train" or "test" from source "hub" (the paper's data,
    through `datasets`) or "synthetic" (offline, seeded); the first n if n is given. The GSM8K
    test split is gsm8k_test: "platinum" (GSM8K with its label errors fixed, the authors'
    choice) or "openai" (the original). Raises DataUnavailable when the data cannot be loaded."""
    _check_task(task)
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
    if gsm8k_test not in GSM8K_TEST_SETS:
        raise ValueError(f"unknown GSM8K test set {gsm8k_test!r}; expected one of: "
                         f"{', '.join(GSM8K_TEST_SETS)}")
    if source == "hub":
        examples = _hub(task, split, gsm8k_test)
    elif source == "synthetic":
        examples = _synthetic(task, split, n, seed)
    else:
        raise ValueError(f"unknown source {source!r}; expected 'hub' or 'synthetic'")
    return examples if n is None else examples[:n]


# ---------------------------------------------------------------- prompts

_REASON = ("Reason step by step inside <think> </think>, then give the final answer inside "
           "<answer> </answer>")

# Worked examples for the sudoku prompt: puzzles of the project's generator (with its own seed)
# that fill up one forced cell at a time, a cell whose row, column and box already hold the three
# other digits, written out step by step (test_agrpo.py regenerates them).
_SUDOKU_EXAMPLES = """\
Puzzle: 0300400300100200
<think>
Rows: 0300 4003 0010 0200.
R2C2: its row, column and box hold 2, 3 and 4, so 1.
R1C1: its row, column and box hold 1, 3 and 4, so 2.
R1C3: its row, column and box hold 1, 2 and 3, so 4.
R1C4: its row, column and box hold 2, 3 and 4, so 1.
R2C3: its row, column and box hold 1, 3 and 4, so 2.
R3C1: its row, column and box hold 1, 2 and 4, so 3.
R3C2: its row, column and box hold 1, 2 and 3, so 4.
R3C4: its row, column and box hold 1, 3 and 4, so 2.
R4C1: its row, column and box hold 2, 3 and 4, so 1.
R4C3: its row, column and box hold 1, 2 and 4, so 3.
R4C4: its row, column and box hold 1, 2 and 3, so 4.
</think>
<answer>
2341412334121234
</answer>

Puzzle: 1043000000002010
<think>
Rows: 1043 0000 0000 2010.
R1C2: its row, column and box hold 1, 3 and 4, so 2.
R2C3: its row, column and box hold 1, 3 and 4, so 2.
R2C4: its row, column and box hold 2, 3 and 4, so 1.
R3C3: its row, column and box hold 1, 2 and 4, so 3.
R3C1: its row, column and box hold 1, 2 and 3, so 4.
R2C1: its row, column and box hold 1, 2 and 4, so 3.
R2C2: its row, column and box hold 1, 2 and 3, so 4.
R3C2: its row, column and box hold 2, 3 and 4, so 1.
R3C4: its row, column and box hold 1, 3 and 4, so 2.
R4C2: its row, column and box hold 1, 2 and 4, so 3.
R4C4: its row, column and box hold 1, 2 and 3, so 4.
</think>
<answer>
1243342141322314
</answer>

Puzzle: 0300000100203000
<think>
Rows: 0300 0001 0020 3000.
R1C3: its row, column and box hold 1, 2 and 3, so 4.
R1C4: its row, column and box hold 1, 3 and 4, so 2.
R1C1: its row, column and box hold 2, 3 and 4, so 1.
R2C3: its row, column and box hold 1, 2 and 4, so 3.
R3C1: its row, column and box hold 1, 2 and 3, so 4.
R2C1: its row, column and box hold 1, 3 and 4, so 2.
R2C2: its row, column and box hold 1, 2 and 3, so 4.
R3C2: its row, column and box hold 2, 3 and 4, so 1.
R3C4: its row, column and box hold 1, 2 and 4, so 3.
R4C2: its row, column and box hold 1, 3 and 4, so 2.
R4C3: its row, column and box hold 2, 3 and 4, so 1.
R4C4: its row, column and box hold 1, 2 and 3, so 4.
</think>
<answer>
1342243141233214
</answer>"""

SYSTEM_PROMPTS = {
    "countdown": (
        "You will be given a target number and three numbers. Write an arithmetic expression "
        "that uses each number exactly once, with +, -, *, / and parentheses, and equals the "
        "target. " + _REASON + " as: expression = target. For example, for target 41 and "
        "numbers [7, 13, 50]:\n<think>\n50 - 13 + 7 = 44 is too big. 7 * 13 = 91, and "
        "91 - 50 = 41.\n</think>\n<answer>\n7 * 13 - 50 = 41\n</answer>"),
    "gsm8k": (
        "You will be given a math problem. " + _REASON + ", with only the final number or "
        "expression in \\boxed{}. For example, for \"A box holds 6 pens. How many pens are left "
        "from 4 boxes after 5 are given away?\":\n<think>\n4 boxes hold 4 * 6 = 24 pens, and "
        "24 - 5 = 19 are left.\n</think>\n<answer>\n\\boxed{19}\n</answer>"),
    "sudoku": (
        "You will be given a 4x4 sudoku as 16 digits, row by row from the top, with 0 for an "
        "empty cell. Fill every empty cell with a digit 1-4 so that each row, each column and "
        "each of the four 2x2 boxes holds 1, 2, 3 and 4 once. " + _REASON + " as the full "
        "grid: 16 digits, no spaces. Three worked examples:\n\n" + _SUDOKU_EXAMPLES),
}
SYSTEM_PROMPTS["math500"] = SYSTEM_PROMPTS["gsm8k"]
