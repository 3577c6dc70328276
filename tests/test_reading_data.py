"""The drawn reading data keeps its promises: held-out numbers never appear in training files."""

import reading_data
import shapes_data


def _answers(kinds, held_out, n=60):
    return {a for _, _, qa in shapes_data.records(n, kinds, seed=5, held_out=held_out) for k, _, a in qa
            if k in ("read", "cell")}


def test_held_out_numbers_never_appear_in_training():
    for kinds in (["read", "text_colour"], ["cell"]):
        train, test = _answers(kinds, False), _answers(kinds, True)
        assert train and test and not train & test


def test_each_family_asks_what_it_was_asked():
    for kinds, size in ((list(reading_data.CHART_KINDS), (160, 100)), (list(reading_data.TEXT_KINDS), (128, 96)),
                        (["cell"], (180, 120))):
        (_, img, qa), = shapes_data.records(1, kinds, seed=1)
        assert img.size == size and [k for k, _, _ in qa] == kinds


def test_training_numbers_use_every_digit_in_every_place():
    train = [str(n).zfill(3) for n in range(1000) if not reading_data.held_out_number(n)]
    assert all({t[i] for t in train} == set("0123456789") for i in range(3))
