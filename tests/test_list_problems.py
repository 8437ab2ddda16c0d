"""The tiny coding demo's problem generator: its reference programs, run in the sandbox, print what
its truth says; the family is large; texts say what programs do."""
import random

import pytest

from sqlm_jax import sandbox
from sqlm_jax.tasks import list_problems as lp



def test_reference_programs_pass_every_ground_truth_test_in_the_sandbox():
    pairs = lp.problems(60, seed=0)
    results = sandbox.run_many([(p.program, tests) for p, tests in pairs], timeout_s=5.0)
    assert all(r.fraction == 1.0 for r in results), [(p.text, r) for (p, _), r in zip(pairs, results) if r.fraction < 1]
    # and a program of another problem fails most of them: the tests tell problems apart
    shifted = sandbox.run_many([(pairs[i - 1][0].program, pairs[i][1]) for i in range(len(pairs))], timeout_s=5.0)
    assert sum(r.fraction < 1 for r in shifted) > 0.8 * len(pairs)


def test_outputs_by_hand():
    even, double, prefix = lp._filters(0)[0], lp._maps(2)[0], lp.REORDERS[3]
    total, listed = lp.FINALS[0], lp.FINALS[-1]
    problem = lp.ListProblem((even, double, total))
    assert problem.text == ("You are given a line of space-separated integers. Keep the even numbers, "
                            "double each number, then print their sum.")
    assert problem.output([3, 4, -2, 7]) == "4\n"
    assert lp.ListProblem((prefix, listed)).output([1, -2, 5]) == "1 -1 4\n"
    assert lp.ListProblem((even, listed)).output([1, 3]) == "\n"  # nothing kept: an empty line
    assert lp.ListProblem((lp._filters(3)[4], lp.FINALS[2])).output([1, 2]) == "0\n"  # none > 3


def test_the_family_is_large_and_seeded():
    rng = random.Random(0)
    texts = {lp.random_problem(rng).text for _ in range(20000)}
    assert len(texts) > 15000  # 20,000 uniform draws from ~6 x 10^4 texts: few repeats
    assert [p.text for p, _ in lp.problems(20, seed=3)] == [p.text for p, _ in lp.problems(20, seed=3)]
    depths = {len(p.stages) for p, _ in lp.problems(500, seed=1)}
    assert depths == {2, 3, 4}


def test_statements_parse_back_to_their_problem_and_nothing_else_does():
    for problem, _ in lp.problems(2000, seed=5):
        assert lp.parse_problem(problem.text) == problem
    even, double, total = lp.FILTERS[0], lp.MAPS[0], lp.FINALS[0]
    good = lp.ListProblem((even, double, total)).text
    for text in (good.replace("Keep the even numbers, double each number", "Double each number, keep the even numbers"),
                 good.replace("double", "triple"), good[:-1], good.replace(", then", ","),
                 "You are given a line of space-separated integers. Print their sum.", ""):
        assert lp.parse_problem(text) is None, text


def test_wrong_tests_are_marked_against_the_truth():
    problem = lp.ListProblem((lp.FILTERS[0], lp.FINALS[0]))  # the sum of the even numbers
    assert lp.wrong_tests(problem, (("1 2 4", "6"), ("3", "0"), ("2 2", "5"), ("-4 1", "-4"))) == \
        [False, False, True, False]
    assert lp.wrong_tests(problem, (("1 x", "0"),)) is None


def test_the_coding_corpus_is_correct_and_leaves_heldout_problems_out():
    from sqlm_jax import tiny_coding_corpus as corpus
    from sqlm_jax.tasks.coding import extract_program, parse_proposal
    heldout = {p.text for p, _ in lp.problems(3000, seed=1234)}
    chats = corpus.chat_examples(3000, seed=0, exclude=heldout, worked=True)
    proposals = [a for u, a in chats if u == corpus.PROPOSER_PROMPT]
    assert 450 < len(proposals) < 750
    for user, reply in chats:
        if user == corpus.PROPOSER_PROMPT:
            statement, tests = parse_proposal(reply)
            assert len(tests) == 5 and not any(lp.wrong_tests(lp.parse_problem(statement), tests))
        else:
            statement = user.removesuffix("\n\n" + corpus.SOLVER_INSTRUCTION)
            assert extract_program(reply) == lp.parse_problem(statement).program
        assert statement not in heldout
    # Without exclude, the same draws meet held-out problems: the exclusion is what keeps them out.
    plain = corpus.chat_examples(3000, seed=0)
    assert any(u.removesuffix("\n\n" + corpus.SOLVER_INSTRUCTION) in heldout for u, _ in plain)


def test_proposal_stats_count_the_proposers_wrong_tests():
    from sqlm_jax import tiny_coding_corpus as corpus
    problem = lp.ListProblem((lp.FILTERS[0], lp.FINALS[0]))  # the sum of the even numbers
    right = corpus.proposal_text(problem, (("1 2 4", "6"), ("3", "0")))
    wrong = corpus.proposal_text(problem, (("1 2 4", "7"), ("3", "0")))
    stats = corpus.proposal_stats([right, wrong, "no tests here", f"Sum them.\nTest Cases:\n1 ||| 1"],
                                  heldout_questions={problem.text})
    assert stats["with_tests_fraction"] == 0.75 and stats["valid_fraction"] == 0.5
    assert stats["wrong_test_fraction"] == 0.25 and stats["proposals_with_a_wrong_test"] == 0.5
    assert stats["heldout_overlap"] == 0.5
    assert stats["wrong_test_fraction_by_input_length"] == {1: 0.0, 3: 0.5}


def test_worked_lines_by_hand():
    odd, double, total = lp.FILTERS[1], lp.MAPS[0], lp.FINALS[0]
    assert lp.ListProblem((odd, double, total)).worked([3, -2, 5]) == "3 -2 5 > 3 5 > 6 10 > 6 16"
    spread = lp.FINALS[6]  # the largest minus the smallest
    assert lp.ListProblem((lp.REORDERS[3], spread)).worked([4, -3, 1]) == "4 -3 1 > 4 1 2 > 4 - 1 = 3"
    assert lp.ListProblem((lp.FILTERS[3], spread)).worked([4, 1]) == "4 1 > none > 0"
    assert lp.ListProblem((lp.FILTERS[3], total)).worked([4, 1]) == "4 1 > none > 0"
    assert lp.ListProblem((lp.FILTERS[0], lp.FINALS[-1])).worked([4, -6]) == "4 -6 > 4 -6 > 4 -6"


def test_a_worked_line_ends_in_the_output_and_holds_no_separator():
    for problem, tests in lp.problems(2000, seed=7):
        for given, expected in tests:
            line = problem.worked([int(x) for x in given.split()])
            assert "|||" not in line and line.startswith(given + " > ")
            last = line.rsplit(" > ", 1)[1].rsplit(" = ", 1)[-1]
            # the sum's running sums end in the sum; an empty list printed is an empty line
            if problem.stages[-1] is lp.FINALS[0]:
                last = last.split()[-1]
            assert (last if last != "none" else "") == expected.strip(), (problem.text, given, line)


def test_nonempty_inputs_let_something_reach_the_final_stage():
    rng = random.Random(0)
    picky = lp.ListProblem((lp._filters(7)[4], lp.FINALS[0]))  # the sum of the numbers greater than 7
    plain = lp.random_inputs(picky, random.Random(1), n=200, length=(1, 4), value=9)
    chosen = lp.random_inputs(picky, rng, n=200, length=(1, 4), value=9, nonempty=True)
    assert sum(not lp.kept(picky, x) for x in plain) > 100
    assert sum(not lp.kept(picky, x) for x in chosen) < 10
    assert all(1 <= len(x) <= 4 and all(-9 <= v <= 9 for v in x) for x in chosen)
