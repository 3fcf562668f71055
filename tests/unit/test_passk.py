"""pass@k against values computed by hand from 1 - C(n-c, k) / C(n, k)."""

import pytest

from cipo_nemo.eval.passk import mean_pass_at_k, pass_at_k


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (6, 2, 3, 0.8),  # 1 - C(4,3)/C(6,3) = 1 - 4/20
        (200, 1, 100, 0.5),  # 1 - C(199,100)/C(200,100) = 1 - 100/200; the binomials overflow a float
        (10, 0, 5, 0.0),  # c = 0: never
        (10, 10, 3, 1.0),  # c = n: always
        (10, 8, 3, 1.0),  # n - c < k: every draw of 3 holds a correct sample
        (5, 1, 5, 1.0),  # k = n with one correct sample
        (5, 0, 5, 0.0),  # k = n with none
        (1, 1, 1, 1.0),
    ],
)
def test_pass_at_k_matches_hand_computed_values(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("n", "c"), [(10, 3), (16, 5), (7, 7), (9, 0), (32, 1)])
def test_pass_at_1_is_the_fraction_correct(n: int, c: int) -> None:
    assert pass_at_k(n, c, 1) == pytest.approx(c / n, abs=1e-12)


@pytest.mark.parametrize(
    ("n", "c", "k", "message"),
    [
        (5, 2, 0, "k must be >= 1"),
        (5, 2, -1, "k must be >= 1"),
        (5, 2, 6, "larger than the number of samples"),
        (5, 6, 1, "c must be in"),
        (5, -1, 1, "c must be in"),
        (-3, 0, 1, "larger than the number of samples"),
        (5, 2.0, 1, "c must be an int"),
        (True, 1, 1, "n must be an int"),
    ],
)
def test_pass_at_k_rejects_invalid_arguments(n: object, c: object, k: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pass_at_k(n, c, k)  # type: ignore[arg-type]


def test_mean_pass_at_k_averages_problems_with_different_sample_counts() -> None:
    # (10, 3) at k=2: 1 - C(7,2)/C(10,2) = 1 - 21/45 = 24/45; (4, 1) at k=2: 0.5.
    assert mean_pass_at_k([(10, 3), (4, 1)], 2) == pytest.approx((24 / 45 + 0.5) / 2, abs=1e-12)
    assert mean_pass_at_k([(10, 3), (5, 2)], 1) == pytest.approx(0.35, abs=1e-12)


def test_mean_pass_at_k_needs_a_problem() -> None:
    with pytest.raises(ValueError, match="at least one problem"):
        mean_pass_at_k([], 1)
