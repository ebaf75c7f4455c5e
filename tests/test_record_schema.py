"""The monitor's record columns (symtools.numeric.record_schema): one writer, one reader, today's bytes.

Records written before the schema module existed (the monitor formatted its column names with f-strings,
copied literally below as ``_legacy_*``) must still be read, and the writer must produce the same names.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from symtools.errors import SymtoolsError
from symtools.numeric import record_schema as rs
from symtools.numeric.records import RecordWriter, read_meta, read_stream

# sites as the monitor numbers them: (family, index, layer, count); layer labels are GroupSet.layer strings
SITES = [("translation", 0, "features.0 → features.1", 3), ("scale", 1, "features.0 → features.1", 3),
         ("rescale", 2, "features.2 → classifier.0", 2), ("translation", 3, "classifier.0 → softmax", 1),
         ("scale", 4, "blocks.1.conv → blocks.1.bn (ünïcode, spaces)", 2)]
QUANTITIES = ("measured", "step", "accumulated", "continuous")  # the monitor's literal tuple before the schema


# ----------------------------------------------------------------------------------------- the old writer
def _legacy_laws(sites):
    """symtools/numeric/monitor.py before the schema (Monitor.on_start), verbatim but for ``s.gs.`` → tuples."""
    columns = ["step"]
    for family, index, layer, _ in sites:
        columns += [f"{family}|{index}|{layer}|{q}" for q in QUANTITIES]
        columns += [f"{family}|{index}|{layer}|residual_{q}" for q in QUANTITIES[1:]]
        columns += [f"{family}|{index}|{layer}|excluded_continuous"]
    return columns


def _legacy_groups(sites):
    return ["step"] + [f"{q}|{index}|{k}" for q in QUANTITIES for _, index, _, count in sites for k in range(count)]


def _legacy_identities(families):
    return ["step"] + [f"{f}|{k}" for f in families for k in ("gradient", "hessian", "pass")]


def _of(family):
    return [s for s in SITES if s[0] == family]


def test_writer_gives_the_legacy_column_names():
    assert rs.law_columns(SITES) == _legacy_laws(SITES)
    for fam in ("translation", "scale", "rescale"):
        assert rs.group_columns(_of(fam)) == _legacy_groups(_of(fam))
        assert rs.groups_meta(_of(fam)) == {"sites": [[i, layer, n] for _, i, layer, n in _of(fam)]}
        assert rs.groups_stream(fam) == f"groups_{fam}" and rs.groups_family(f"groups_{fam}") == fam
    assert rs.identity_columns(["rescale", "scale"]) == _legacy_identities(["rescale", "scale"])
    assert rs.groups_family("laws") is None and rs.groups_family("groups_") is None
    # Site objects and plain tuples alike
    assert rs.law_columns([rs.Site(*s) for s in SITES]) == rs.law_columns(SITES)


def test_records_written_with_the_legacy_names_are_read(tmp_path):
    """Write laws and groups streams exactly as the monitor did before the schema; read them with the schema."""
    rng = np.random.default_rng(0)
    laws_cols = _legacy_laws(SITES)
    laws = rng.normal(size=(4, len(laws_cols)))
    laws[:, 0] = np.arange(4)
    laws[0, [j for j, c in enumerate(laws_cols) if "|residual_" in c or c.endswith("|excluded_continuous")]] = np.nan
    fam_sites = _of("scale")
    group_cols = _legacy_groups(fam_sites)
    groups = rng.normal(size=(2, len(group_cols)))
    groups[:, 0] = [0, 2]
    with RecordWriter(tmp_path) as w:
        w.stream("laws", laws_cols, meta={"optimizer": "momentum"}).append(laws)
        w.stream("groups_scale", group_cols, meta={"sites": [[i, layer, n] for _, i, layer, n in fam_sites]}).append(groups)
    # on disk: the column list is byte-identical to what the schema writes
    spec = json.loads((tmp_path / "laws.json").read_text(encoding="utf-8"))
    assert spec["columns"] == rs.law_columns(SITES)

    cols, data = read_stream(tmp_path, "laws")
    series = rs.read_laws(cols, data)
    assert [(s.family, s.index, s.layer) for s in series] == [(f, i, layer) for f, i, layer, _ in SITES]
    for s in series:
        assert set(s.values) == set(rs.LAW_COLUMN_QUANTITIES)
        for q in rs.LAW_COLUMN_QUANTITIES:
            j = laws_cols.index(f"{s.family}|{s.index}|{s.layer}|{q}")
            np.testing.assert_array_equal(s.values[q], laws[:, j])
        assert s.has("measured") and s.has(rs.residual("step"))

    cols, data = read_stream(tmp_path, "groups_scale", mmap=True)
    read = rs.read_groups(cols, data, read_meta(tmp_path, "groups_scale")["meta"]["sites"], family="scale")
    assert [(g.family, g.index, g.layer, g.count) for g in read] == [("scale", i, layer, n) for _, i, layer, n in fam_sites]
    for g in read:
        for q in QUANTITIES:
            expect = groups[:, [group_cols.index(f"{q}|{g.index}|{k}") for k in range(g.count)]]
            np.testing.assert_array_equal(g.values(q), expect)
            np.testing.assert_array_equal(g.values(q, [g.count - 1]), expect[:, -1:])


_FIELD = st.text(st.characters(blacklist_characters="|", blacklist_categories=("Cs",)), max_size=30)


@given(family=_FIELD.filter(bool), index=st.integers(0, 10**6), layer=_FIELD,
       quantity=st.sampled_from(rs.LAW_COLUMN_QUANTITIES), k=st.integers(0, 10**6))
def test_every_name_round_trips(family, index, layer, quantity, k):
    name = rs.law_column(family, index, layer, quantity)
    assert name == f"{family}|{index}|{layer}|{quantity}"  # the grammar, literally
    assert rs.parse_law_column(name) == rs.LawColumn(family, index, layer, quantity)
    q = quantity if quantity in rs.GROUP_QUANTITIES else "measured"
    assert rs.parse_group_column(rs.group_column(q, index, k)) == rs.GroupColumn(q, index, k)
    assert rs.parse_identity_column(rs.identity_column(family, "hessian")) == rs.IdentityColumn(family, "hessian")


@pytest.mark.parametrize("name", ["step", "scale|0|measured", "scale|x|a → b|measured", "|0|a|measured",
                                  "scale|-1|a|measured", "scale|+1|a|measured", "scale|٣|a|measured",
                                  "scale|0|a|", "scale| 0|a|measured"])
def test_malformed_laws_column_is_a_clear_error(name):
    with pytest.raises(SymtoolsError, match=r"malformed laws column .*family\|index\|layer\|quantity"):
        rs.parse_law_column(name)
    with pytest.raises(SymtoolsError, match="malformed laws column"):
        rs.read_laws(["step", name], np.zeros((1, 2)))


@pytest.mark.parametrize("name", ["measured|0", "measured|a|1", "measured|0|1|2", "|0|1", "measured|0|-1"])
def test_malformed_groups_column_is_a_clear_error(name):
    with pytest.raises(SymtoolsError, match=r"malformed groups column .*quantity\|index\|k"):
        rs.parse_group_column(name)


def test_malformed_identities_column_is_a_clear_error():
    for name in ("scale|gradients", "scale", "|pass", "a|b|pass"):
        with pytest.raises(SymtoolsError, match="malformed identities column"):
            rs.parse_identity_column(name)


def test_writer_refuses_what_the_reader_could_not_split():
    with pytest.raises(SymtoolsError, match=r"layer 'a\|b' contains '\|'"):
        rs.law_column("scale", 0, "a|b", "measured")
    with pytest.raises(SymtoolsError, match="family"):
        rs.law_column("sc|ale", 0, "a", "measured")
    with pytest.raises(SymtoolsError, match="unknown laws quantity 'charge'"):
        rs.law_column("scale", 0, "a", "charge")
    with pytest.raises(SymtoolsError, match="unknown groups quantity 'residual_step'"):
        rs.group_column("residual_step", 0, 0)
    for bad in (-1, True, 1.0, "1"):
        with pytest.raises(SymtoolsError, match="non-negative integer"):
            rs.law_column("scale", bad, "a", "measured")
    with pytest.raises(SymtoolsError, match="site indices repeat"):
        rs.law_columns([("scale", 0, "a", 1), ("rescale", 0, "b", 1)])
    with pytest.raises(SymtoolsError, match="one family"):
        rs.group_columns([("scale", 0, "a", 1), ("rescale", 1, "b", 1)])
    with pytest.raises(SymtoolsError, match="no residual"):
        rs.residual("measured")


def test_reader_takes_a_bar_in_a_legacy_layer_and_refuses_inconsistent_sites():
    # before the schema nothing stopped a "|" in a layer label; such records still read
    assert rs.parse_law_column("scale|2|a|b → c|residual_step") == rs.LawColumn("scale", 2, "a|b → c", "residual_step")
    with pytest.raises(SymtoolsError, match="site 0 is named both"):
        rs.read_laws(["step", "scale|0|a|measured", "scale|0|b|step"], np.zeros((1, 3)))
    with pytest.raises(SymtoolsError, match="appears twice"):
        rs.read_laws(["step", "scale|0|a|measured", "scale|0|a|measured"], np.zeros((1, 3)))
    with pytest.raises(SymtoolsError, match="column 0 must be 'step'"):
        rs.read_laws(["scale|0|a|measured"], np.zeros((1, 1)))


def test_groups_reader_strict_and_tolerant():
    cols = ["step", "measured|0|0", "measured|0|1", "step|0|0", "other", "measured|5|0"]
    data = np.arange(12.0).reshape(2, 6)
    with pytest.raises(SymtoolsError, match="malformed groups column 'other'"):
        rs.read_groups(cols, data, [[0, "a", 2]])
    with pytest.raises(SymtoolsError, match="names site 5"):
        rs.read_groups(cols[:4] + cols[5:], data[:, [0, 1, 2, 3, 5]], [[0, "a", 2]])
    with pytest.raises(SymtoolsError, match="step columns for groups 0 … 0"):
        rs.read_groups(cols[:4], data[:, :4], [[0, "a", 2]])
    # a stream of unknown origin: what does not fit is left out
    (site,) = rs.read_groups(cols, data, [[0, "a", 2], "junk"], strict=False)
    assert site.count == 2 and set(site.columns) == {"measured"}
    np.testing.assert_array_equal(site.values("measured"), data[:, 1:3])
    # dict entries, and a count the meta does not give
    (site,) = rs.read_groups(cols[:3], data[:, :3], [{"index": 0, "layer": "a"}])
    assert site.count == 2 and site.layer == "a"
    with pytest.raises(SymtoolsError, match="meta\\['sites'\\]"):
        rs.parse_sites({"0": "a"})


# ----------------------------------------------------------------------------------------- worst residuals
def _legacy_restore_worst(cols, rows, step, sites):
    """Monitor._restore_worst before the schema, verbatim but for ``self``/``s.gs`` (the reference semantics)."""
    rows = rows[rows[:, 0] <= step]
    where = {c: j for j, c in enumerate(cols)}
    worst = {"step": None, "accumulated": None, "continuous": None}
    worst_family, excluded_family = {}, {}
    for fam in sorted({s[0] for s in sites}):
        fsites = [s for s in sites if s[0] == fam]
        entry = {}
        for key in ("step", "accumulated", "continuous"):
            vals = rows[:, [where[f"{fam}|{s[1]}|{s[2]}|residual_{key}"] for s in fsites]]
            vals = vals[~np.isnan(vals)]
            entry[key] = float(vals.max()) if vals.size else None
            if entry[key] is not None:
                worst[key] = entry[key] if worst[key] is None else max(worst[key], entry[key])
        worst_family[fam] = entry
        counts = rows[:, [where[f"{fam}|{s[1]}|{s[2]}|excluded_continuous"] for s in fsites]]
        counted = ~np.isnan(counts).all(axis=1)
        if counted.any():
            excluded_family[fam] = int(np.nansum(counts[counted], axis=1).max())
    return worst_family, worst, excluded_family


def test_worst_residuals_match_the_monitors_former_restore():
    rng = np.random.default_rng(1)
    cols = rs.law_columns(SITES)
    rows = np.abs(rng.normal(size=(7, len(cols))))
    rows[:, 0] = np.arange(7)
    rows[0, 1:] = np.nan                                   # step 0: nothing predicted
    rows[:, [j for j, c in enumerate(cols) if c.startswith("rescale|") and "continuous" in c]] = np.nan  # no theory
    rows[3, cols.index("scale|1|features.0 → features.1|excluded_continuous")] = np.nan  # a site with none then
    exc = [j for j, c in enumerate(cols) if c.endswith("excluded_continuous")]
    rows[:, exc] = np.round(rows[:, exc] * 3)
    for step in (0, 2, 4, 6, 100):
        got = rs.worst_residuals(cols, rows, step)
        assert got == _legacy_restore_worst(cols, rows, step, SITES), step
    per_family, overall, excluded = rs.worst_residuals(cols, rows, 6)
    assert per_family["rescale"]["continuous"] is None and "rescale" not in excluded
    assert overall["step"] == max(f["step"] for f in per_family.values())
    assert rs.worst_residuals(cols, rows, -1) == ({}, {"step": None, "accumulated": None, "continuous": None}, {})
    assert set(rs.worst_residuals(cols, rows, 6, families=["scale"])[0]) == {"scale"}


def test_worst_residuals_of_a_monitored_run_equal_its_summary(tmp_path):
    from symtools.nn.graph import find_symmetries
    from symtools.nn.small import cnn
    from symtools.numeric.monitor import Monitor
    from symtools.training import train

    torch.manual_seed(0)
    model = cnn(3, [4, 6], 5, 8, norm="batch")
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(4)]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, weight_decay=5e-3, momentum=0.9)
    summary = train(model, opt, batches, 4, out_dir=tmp_path / "run",
                    callbacks=[Monitor(find_symmetries(model, batches[0][0][:1]), stride=2)], progress=False)
    cols, rows = read_stream(tmp_path / "run" / "records", "laws")
    per_family, overall, excluded = rs.worst_residuals(cols, rows, 4)
    assert overall == {"step": summary["max_rel_residual_discrete"],
                       "accumulated": summary["max_rel_residual_accumulated"],
                       "continuous": summary["max_rel_residual_continuous"]}
    assert set(per_family) == set(summary["families"])
    for fam, entry in summary["families"].items():
        assert per_family[fam] == {"step": entry["max_rel_residual_discrete"],
                                   "accumulated": entry["max_rel_residual_accumulated"],
                                   "continuous": entry["max_rel_residual_continuous"]}
        assert excluded.get(fam) == entry["continuous_excluded_groups"]
    assert all(v is not None and math.isfinite(v) for v in overall.values())
