"""``regrow claims``: the pipeline end to end on --quick settings, resumability, and the
verdict arithmetic against independent computations."""
from __future__ import annotations

import re

import pytest
from scipy.stats import spearmanr

from regrow.experiments.claims import CLAIMS, run_claims
from regrow.experiments.claims.evidence import VERDICTS, at_least, rises, spearman, verdict


@pytest.mark.slow
def test_claims_quick_writes_every_claim_and_resumes(tmp_path, capsys):
    from regrow.experiments.cli import main
    out, docs = tmp_path / "claims", tmp_path / "docs"
    assert main(["claims", "--quick", "--out", str(out), "--doc-dir", str(docs), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert len(re.findall(r"^claim \d \(.+\): ", printed, flags=re.M)) == len(CLAIMS) == 8
    text = (docs / "claims.md").read_text()
    for number in CLAIMS:
        assert f"## {number}. " in text
        assert any((docs / "figures" / "claims").glob(f"claim{number}_*.png"))
    verdicts = re.findall(r"\*\*Verdict: (.+?)\.\*\*", text)
    assert len(verdicts) == 8 and set(verdicts) <= set(VERDICTS)
    for link in re.findall(r"!\[claim \d\]\((.+?)\)", text):
        assert (docs / link).is_file(), link
    summaries = sorted(out.glob("runs/*/summary.json"))
    assert summaries and sorted(out.glob("gnn/*.json"))
    stamps = {p: p.stat().st_mtime_ns for p in summaries}
    # a second invocation reuses every finished run
    results = run_claims(out, quick=True, only=[1, 4])
    assert [r.number for r in results] == [1, 4]
    assert {p: p.stat().st_mtime_ns for p in summaries} == stamps


def test_claims_need_the_data_unless_quick(tmp_path):
    with pytest.raises(ValueError, match="--data-dir"):
        run_claims(tmp_path, only=[4])
    with pytest.raises(ValueError, match="unknown claim"):
        run_claims(tmp_path, quick=True, only=[9])


@pytest.mark.parametrize("xs, ys", [([1, 2, 3, 4], [1, 3, 2, 5]), ([0.1, 0.5, 0.2, 0.9, 0.3], [3, 3, 1, 7, 2]),
                                    ([1, 2, 3], [3, 2, 1])])
def test_spearman_matches_scipy(xs, ys):
    assert spearman(xs, ys) == pytest.approx(spearmanr(xs, ys).statistic)


def test_verdict_words_follow_the_parts():
    assert verdict([True, True]) == "holds"
    assert verdict([True, False]) == "partly"
    assert verdict([False, False]) == "does not hold"
    assert rises([1, 2, 4], [0.80, 0.82, 0.85], [0.005, 0.005, 0.005])
    assert not rises([1, 2, 4], [0.80, 0.82, 0.805], [0.01, 0.01, 0.01])   # within noise
    assert at_least((0.80, 0.01, 3), (0.81, 0.01, 3)) and not at_least((0.78, 0.005, 3), (0.81, 0.005, 3))
