"""The surface-form task: every form (and every mixture of forms) is a correct chain the checker accepts, and the
labels of probed positions are right on hand-made cases (a form choice, a wrong digit, a wrong carry, after a
mistake, the only correct token)."""
import json
import random

import pytest

from megatron_topd.tasks import AdditionFormsTask, AdditionTask, make_task
from megatron_topd.tasks.addition import Problem
from megatron_topd.tasks.addition_forms import END, FORMS

P = Problem(4071, 968)  # steps: 1+8+0=09; 7+6+0=13; 0+9+1=10; 4+0+1=05; >05039
TASK = AdditionFormsTask(4)


def test_forms_by_hand_and_the_default_is_the_demo_chain():
    assert TASK.solution(P) == AdditionTask(4).solution(P)
    assert TASK.solution(P, ["ba", "sum_first", "ab", "ba"]) == "8+1+0=09;13=7+6+0;0+9+1=10;0+4+1=05;>05039"
    assert TASK.solution(P, ["sum_first"] * 4) == "09=1+8+0;13=7+6+0;10=0+9+1;05=4+0+1;>05039"
    with pytest.raises(ValueError, match="forms"):
        TASK.solution(P, ["ab", "xy", "ab", "ab"])
    with pytest.raises(ValueError, match="form weights"):
        TASK.sample_solution(P, random.Random(0), [1.0, 0.0])
    assert make_task("addition_forms", digits=4) == TASK


def test_every_mixture_of_forms_is_accepted_and_a_wrong_chain_is_not():
    rng = random.Random(0)
    for p in TASK.problems(30, seed=5) + [Problem(0, 0), Problem(9999, 9999), P]:
        for forms in ([f] * 4 for f in FORMS):
            chain = TASK.solution(p, forms)
            assert TASK.is_correct(chain, TASK.answer(p)) and TASK.chain_is_correct(p, chain)
        mixed = TASK.sample_solution(p, rng, [0.5, 0.3, 0.2])
        assert TASK.is_correct(mixed, TASK.answer(p)) and TASK.chain_is_correct(p, mixed)
    assert not TASK.chain_is_correct(P, "1+8+0=09;7+6+0=31;0+9+1=10;4+0+1=05;>05039")  # "=31;" for "=13;"
    assert not TASK.chain_is_correct(P, TASK.solution(P) + "9")
    assert not TASK.chain_is_correct(P, TASK.solution(P)[:-1])  # the answer is not finished
    assert TASK.problem_from_prompt("4071+0968=") == P
    with pytest.raises(ValueError, match="addition prompt"):
        TASK.problem_from_prompt("4071*0968=")


def test_next_tokens_by_hand():
    assert TASK.next_tokens(P, "") == {"1", "8", "0"}  # ab, ba, sum_first
    assert TASK.next_tokens(P, "1") == {"+"}
    assert TASK.next_tokens(P, "09=") == {"1"}
    assert TASK.next_tokens(P, "1+8+0=09;") == {"7", "6", "1"}
    assert TASK.next_tokens(P, TASK.solution(P)[:-1]) == {"9"}
    assert TASK.next_tokens(P, TASK.solution(P)) == {END}
    assert TASK.next_tokens(P, "1+8+0=08") == set()


@pytest.mark.parametrize("prefix,token,label", [
    ("1+8+0=09;", "6", "surface"),              # 6+7+0=13; instead of 7+6+0=13;: the same step in form ba
    ("1+8+0=09;", "1", "surface"),              # 13=7+6+0;: form sum_first
    ("", "8", "surface"),
    ("1+8+0=09;", "5", "divergent"),            # a wrong digit opens the step
    ("1+8+0=09;7+6+0=1", "4", "divergent"),     # a wrong sum digit
    ("1+8+0=09;7+6+0=", "3", "divergent"),      # "=31;": the carry and the sum swapped
    ("1+8+0=09;7+6+0=13;0+9+", "0", "divergent"),  # the carry from step 2 dropped
    ("1+8+0=09;7+6+0=", "1", "neither"),        # the only correct token
    ("1+8+0=09;7+6+0=13;0+9+1=10;4+0+1=05;>05039", END, "neither"),
    ("1+8+0=09;7+6+0=13;0+9+1=10;4+0+1=05;>05039", "9", "divergent"),  # writing past the answer
    ("1+8+0=08;", "7", "neither"),              # already off every correct chain
])
def test_candidate_labels_by_hand(prefix, token, label):
    assert TASK.candidate_label(P, prefix, token) == label


def test_asset_recipes_of_the_arms_and_their_training_chains():
    from dataclasses import asdict

    from megatron_topd.task_assets import AssetRecipe, _stamp, asset_stamps, recipe_for, training_chains

    robust, clean = recipe_for("addition_forms", "robust"), recipe_for("addition_forms", "clean")
    assert robust.teacher.corruption == 0.5 and clean.teacher.corruption == 0.0
    assert robust.teacher.form_weights != robust.student.form_weights  # the student prefers another form
    assert asdict(recipe_for()) == asdict(AssetRecipe())  # the demo's recipe is unchanged ...
    assert _stamp(asdict(AssetRecipe())).keys() == asdict(AssetRecipe()).keys() - {"task"}  # ... and so its cache
    demo = asset_stamps(AssetRecipe())  # the student's stopping rule is not in the demo's stamps (built before it)
    assert all(json.loads(v).keys() == {"data", "model", "target"} for v in [demo["teacher"]])
    assert json.loads(demo["student"]).keys() == {"data", "model"} and "student_target" not in demo["student"]
    # addition_forms: 360 fixed steps left its student at 0.2% held-out accuracy; it trains to 35% instead, and that
    # rule is the student's stamp alone (changing it never rebuilds the teacher)
    forms = recipe_for("addition_forms", "robust")
    assert forms.student_target == 0.35 and forms.student.steps >= 1000
    stamps = asset_stamps(forms)
    assert '"target": 0.35' in stamps["student"] and "0.35" not in stamps["teacher"]
    forms.student_target = 0.5
    assert asset_stamps(forms)["teacher"] == stamps["teacher"] and asset_stamps(forms)["student"] != stamps["student"]
    problems = TASK.problems(200, seed=1)
    chains = training_chains(TASK, problems, robust.teacher)
    assert all(TASK.chain_is_correct(p, c) for p, c in zip(problems, chains))

    def sum_first_share(chains):  # steps written sum first have '=' as their third character
        steps = [c[i:i + 9] for c in chains for i in range(0, 36, 9)]
        return sum(s[2] == "=" for s in steps) / len(steps)

    student = training_chains(TASK, problems, robust.student)
    assert sum_first_share(chains) < 0.3 < 0.5 < sum_first_share(student)  # weights 0.2 and 0.6
    with pytest.raises(ValueError, match="addition_forms"):
        training_chains(AdditionTask(4), problems, robust.teacher)
    with pytest.raises(ValueError, match="teacher arm"):
        recipe_for("addition_forms", "fragile")
