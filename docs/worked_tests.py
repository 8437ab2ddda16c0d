"""Can a tiny coding model compute its own tests? The proposer's task with its sampling noise taken out.

    python docs/worked_tests.py MODEL_DIR [--worked] [--temperature T] [--problems K]

For K generator problems, each with 5 inputs of 1-4 integers in [-9, 9] that pass the filter (the
corpus of `corpus.worked`), the model is given its own proposer prompt, the statement, "Test Cases:"
and one input, and writes the rest: with --worked the scratchpad line after "INPUT > " and then the
test line, without it the output after "INPUT ||| ". Printed: how often the output (and the worked
line, and the copy of the input onto the test line) is the generator's truth. Issue 33 (docs/results.md).
"""
import argparse
import json
import random

from sqlm_jax import sampling, tiny_coding_corpus
from sqlm_jax.models import load_pretrained
from sqlm_jax.tasks import list_problems
from sqlm_jax.tokenizer import load_tokenizer


def cases(k: int, seed: int = 0):
    """(problem, input) pairs: ``k`` problems, 5 inputs each."""
    rng = random.Random(seed)
    out = []
    for _ in range(k):
        problem = list_problems.random_problem(rng)
        out += [(problem, x) for x in list_problems.random_inputs(problem, rng, 5, (1, 4), 9, nonempty=True)]
    return out


def judge(problem, numbers, continuation: str, worked: bool) -> dict:
    """Right or not, from the model's continuation after the forced "INPUT > " (or "INPUT ||| ")."""
    given, truth = " ".join(map(str, numbers)), problem.output(numbers).strip()
    lines = continuation.split("\n")
    if not worked:
        return {"output": lines[0].strip() == truth}
    work, test = lines[0], lines[1] if len(lines) > 1 else ""
    copied, _, output = test.partition("|||")
    return {"work": f"{given} > {work}" == problem.worked(numbers), "copy": copied.strip() == given,
            "output": bool(_) and output.strip() == truth}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--worked", action="store_true")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--problems", type=int, default=60)
    args = parser.parse_args()
    model, _ = load_pretrained(args.model)
    tok = load_tokenizer(args.model)
    pairs = cases(args.problems)
    head = tok.chat_prompt(tiny_coding_corpus.PROPOSER_PROMPT)
    sep = " > " if args.worked else " ||| "
    prompts = [head + tok.encode(f"{p.text}\n{tiny_coding_corpus.TESTS_MARKER}\n{' '.join(map(str, x))}{sep}")
               for p, x in pairs]
    out = sampling.generate(model, prompts, max_new_tokens=112 if args.worked else 24,
                            temperature=args.temperature, stop_ids=tok.stop_ids, pad_id=tok.pad_id, seed=0)
    verdicts = [judge(p, x, tok.decode(r), args.worked) for (p, x), r in zip(pairs, out.token_lists)]
    summary = {key: sum(v[key] for v in verdicts) / len(verdicts) for key in verdicts[0]}
    print(json.dumps({"model": args.model, "worked": args.worked, "temperature": args.temperature,
                      "tests": len(verdicts), **summary}))


if __name__ == "__main__":
    main()
