"""--sweep: parsing and checking the grid, derived ids, the expanded manifest and its grouping (no model)."""

from __future__ import annotations

import re

import pytest

from pnp_batch.cli import main
from pnp_batch.config import load_config, parse_layers
from pnp_batch.io.manifest import ID_PATTERN, ManifestError, group_rows, open_manifest
from pnp_batch.io.sweep import MAX_GRID, SweepError, SweptManifest, derived_id, parse_sweeps

CFG = load_config("tiny")
ISSUE_GRID = ["pnp_f_t=0.4,0.6,0.8", "pnp_attn_t=0.25,0.5", "guidance_scale=5,7.5,10"]


def _manifest(tmp_path, make_png, rows: list[str], header: str = "id,image,source_prompt,target_prompt") -> str:
    (tmp_path / "a.png").write_bytes(make_png(seed=1))
    (tmp_path / "b.png").write_bytes(make_png(seed=2))
    path = tmp_path / "m.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return str(path)


def test_the_issues_grid_has_18_settings_named_with_sorted_keys_and_values_as_given():
    sweep = parse_sweeps(ISSUE_GRID, CFG)
    assert sweep.keys == ("guidance_scale", "pnp_attn_t", "pnp_f_t") and sweep.size == 18
    points = sweep.points()
    assert points[0] == ("guidance_scale=5,pnp_attn_t=0.25,pnp_f_t=0.4",
                         {"guidance_scale": 5.0, "pnp_attn_t": 0.25, "pnp_f_t": 0.4})
    assert points[-1][0] == "guidance_scale=10,pnp_attn_t=0.5,pnp_f_t=0.8"
    assert len({label for label, _ in points}) == 18
    # the order of the --sweep options does not matter
    assert parse_sweeps(list(reversed(ISSUE_GRID)), CFG).points() == points
    assert parse_sweeps(sweep.to_items(), CFG) == sweep


def test_layer_and_mode_values():
    sweep = parse_sweeps(["pnp_attn_layers=default,4-11,none,9;10;11", "negative_prompt_mode=fixed,source"], CFG)
    values = dict(zip(sweep.keys, sweep.values))
    layers = [v for _, v in values["pnp_attn_layers"]]
    assert layers[0] is None and layers[2] == () and len(layers[1]) == 8
    assert layers[1] == parse_layers("pnp_attn_layers", "up_blocks.1.attentions.1;5-11")
    # a decoder layer number names the attention module of that layer (all its transformer blocks)
    assert layers[3] == tuple(f"up_blocks.3.attentions.{i}" for i in range(3))
    assert parse_layers("pnp_feature_blocks", "4") == ("up_blocks.1.resnets.1",)
    assert parse_layers("pnp_attn_layers", "up_blocks.2.attentions.0.transformer_blocks.0.attn1;4") == (
        "up_blocks.1.attentions.1", "up_blocks.2.attentions.0.transformer_blocks.0.attn1")


@pytest.mark.parametrize(("items", "reason"), [
    (["foo=1,2"], "unknown key 'foo'"),
    (["model=a,b"], "unknown key 'model'"),
    (["pnp_f_t="], "empty value list"),
    (["pnp_f_t=0.4,,0.6"], "empty value"),
    (["pnp_f_t"], "must be KEY=VALUE1,VALUE2"),
    (["pnp_f_t=abc"], "'abc' is not a number"),
    (["pnp_f_t=1.5"], "pnp_f_t=1.5 must be a number from 0 to 1"),
    (["guidance_scale=-1"], "must be a number >= 0"),
    (["seed=1.5"], "not a whole number"),
    (["negative_prompt_mode=fixed,sometimes"], "'sometimes' is not one of fixed, source, blend"),
    (["pnp_attn_layers=12"], "decoder layer 12 does not exist"),
    (["pnp_attn_layers=9-3"], "runs backwards"),
    (["pnp_feature_blocks=down_blocks.1.resnets.1"], "unknown layer 'down_blocks.1.resnets.1'"),
    (["pnp_attn_layers=up_blocks.1.resnets.1"], "an attention module such as up_blocks.2.attentions.0"),
    (["pnp_f_t=0.4", "pnp_f_t=0.6"], "given twice"),
    (["guidance_scale=5,5.0"], "the same value is given twice"),
])
def test_bad_sweeps_are_rejected_with_the_reason(items, reason):
    with pytest.raises(SweepError, match=re.escape(reason)):
        parse_sweeps(items, CFG)


def test_a_grid_over_the_limit_needs_yes():
    items = [f"seed={','.join(map(str, range(101)))}", f"pnp_f_t={','.join(str(i / 100) for i in range(100))}"]
    with pytest.raises(SweepError, match="10,100 settings per row.*--yes"):
        parse_sweeps(items, CFG)
    assert parse_sweeps(items, CFG, yes=True).size == 10_100 > MAX_GRID
    assert parse_sweeps([f"seed={','.join(map(str, range(MAX_GRID)))}"], CFG).size == MAX_GRID


def test_derived_ids_are_safe_unique_and_deterministic():
    pat = re.compile(ID_PATTERN)
    assert derived_id("row7", "gs5_ft0.4") == "row7.gs5_ft0.4"
    longest = "x" * 128
    slugs = parse_sweeps(ISSUE_GRID, CFG).slugs()
    ids = {derived_id(longest, s) for s in slugs} | {derived_id("x" * 127 + "y", s) for s in slugs}
    assert len(ids) == 36 and all(pat.fullmatch(i) for i in ids)
    assert derived_id(longest, slugs[17]) == derived_id(longest, slugs[17])
    assert derived_id(longest, slugs[17]).endswith(".gs10_attn0.5_ft0.8")
    long_slug = "alayers" + "-".join(str(i) for i in range(40))  # over 64 characters: hashed
    assert pat.fullmatch(derived_id("row7", long_slug)) and len(derived_id("row7", long_slug)) == len("row7.h") + 16


def test_setting_ids_come_from_values_not_positions():
    """Growing or shrinking a grid keeps each point's id: the id is made from the point's values, written
    however the number was (5 = 5.0, 0.40 = 0.4); text values that are not plain words are hashed."""
    small = parse_sweeps(["pnp_f_t=0.4,0.8"], CFG).slugs()
    grown = parse_sweeps(["pnp_f_t=0.40,0.6,0.8"], CFG).slugs()
    assert small == ["ft0.4", "ft0.8"] and grown == ["ft0.4", "ft0.6", "ft0.8"]
    assert parse_sweeps(["guidance_scale=5.0,7.5"], CFG).slugs() == ["gs5", "gs7.5"]
    neg = parse_sweeps(["negative_prompt=a blurry photo,ugly"], CFG).slugs()
    assert neg[1] == "negugly" and re.fullmatch(r"negh[0-9a-f]{8}", neg[0])


def test_expanded_rows_carry_source_id_setting_and_overrides(tmp_path, make_png):
    uri = _manifest(tmp_path, make_png, ["r1,a.png,a photo,a statue", "r2,b.png,a photo,a sketch",
                                          "r3,a.png,a photo,a painting"], header="id,image,source_prompt,target_prompt")
    sweep = parse_sweeps(ISSUE_GRID, CFG)
    m = SweptManifest(open_manifest(uri), sweep)
    assert m.check_ids() == 3 * 18
    rows = list(m.iter_rows())
    assert [r.id for r in rows[:2]] == ["r1.gs5_attn0.25_ft0.4", "r1.gs5_attn0.25_ft0.6"]
    assert rows[18].id == "r2.gs5_attn0.25_ft0.4"
    assert [r.index for r in rows] == list(range(54))
    assert [i for i, _ in m.iter_ids()] == list(range(54)) and [rid for _, rid in m.iter_ids()] == [r.id for r in rows]
    r = rows[1]
    assert r.extra == {"source_id": "r1", "setting": "guidance_scale=5,pnp_attn_t=0.25,pnp_f_t=0.6"}
    assert r.overrides == {"guidance_scale": 5.0, "pnp_attn_t": 0.25, "pnp_f_t": 0.6}
    assert m.extra_schema.names == ["source_id", "setting"]
    # every grid point of a source image in one group: r1 and r3 share a.png (36 rows), r2 has its own
    groups = list(group_rows(m.iter_rows(), window=54))
    assert sorted(len(g) for g in groups) == [18, 36]
    assert {r.extra["source_id"] for r in max(groups, key=len)} == {"r1", "r3"}
    # --limit counts expanded rows here (the driver passes manifest rows x grid)
    assert [r.id for r in m.iter_rows(limit=20)][-1] == "r2.gs5_attn0.25_ft0.6"


def test_rows_that_cannot_share_a_batch_form_groups_of_their_own(tmp_path, make_png):
    uri = _manifest(tmp_path, make_png, ["r1,a.png,a photo,a statue"])
    sweep = parse_sweeps(["pnp_f_t=0.4,0.8", "pnp_attn_layers=default,9-11", "negative_prompt_mode=fixed,blend"], CFG)
    groups = list(group_rows(SweptManifest(open_manifest(uri), sweep).iter_rows()))
    assert [len(g) for g in groups] == [2, 2, 2, 2]  # pnp_f_t shares a batch; layers x mode do not
    for g in groups:
        assert len({(r.overrides["pnp_attn_layers"], r.overrides["negative_prompt_mode"]) for r in g}) == 1
    assert len({r.source_key for g in groups for r in g}) == 1  # one source: one inversion (feature key)


def test_sweep_columns_in_the_manifest_are_rejected(tmp_path, make_png):
    uri = _manifest(tmp_path, make_png, ["r1,a.png,a statue,x"], header="id,image,target_prompt,setting")
    with pytest.raises(ManifestError, match="setting"):
        SweptManifest(open_manifest(uri), parse_sweeps(ISSUE_GRID, CFG))


def test_cli_bad_sweep_exits_2_and_writes_nothing(tmp_path, make_png, capsys):
    uri = _manifest(tmp_path, make_png, ["r1,a.png,a photo,a statue"])
    out = tmp_path / "out"
    assert main(["run", uri, "--out", str(out), "--pipeline", "tiny", "--sweep", "pnp_f_t=0.4,2"]) == 2
    assert "pnp_f_t=2.0 must be a number from 0 to 1" in capsys.readouterr().err
    assert main(["run", uri, "--out", str(out), "--pipeline", "tiny", "--sweep", "colour=red"]) == 2
    assert "unknown key 'colour'" in capsys.readouterr().err
    assert main(["run", uri, "--out", str(out), "--pipeline", "tiny", "--set", "pnp_attn_layers=up_blocks.9"]) == 2
    assert "unknown layer 'up_blocks.9'" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("how", [["--set", "pnp_attn_layers=up_blocks.0.attentions.0"],
                                 ["--sweep", "pnp_feature_blocks=default,up_blocks.1.resnets.7"]])
def test_cli_layers_the_model_lacks_exit_2_naming_the_valid_ones(tmp_path, make_png, capsys, how):
    """Layer names are checked against the loaded UNet (they differ between SD and SDXL): every layer
    setting of the run, a sweep's too, before any row is translated."""
    uri = _manifest(tmp_path, make_png, ["r1,a.png,a photo,a statue"])
    out = tmp_path / "out"
    assert main(["run", uri, "--out", str(out), "--pipeline", "tiny", *how]) == 2
    err = capsys.readouterr().err
    assert "up_blocks.0.attentions.0" in err or "up_blocks.1.resnets.7" in err
    assert "valid:" in err and ("up_blocks.3.attentions.2" in err or "up_blocks.1.resnets.1" in err)
    assert "decoder layers 3-11" in err or "decoder layers 0-11" in err
    assert not list(out.rglob("*.parquet")) and not list(out.rglob("*.png"))


def test_cli_dry_run_prints_the_grid(tmp_path, make_png, capsys):
    uri = _manifest(tmp_path, make_png, ["r1,a.png,a photo,a statue", "r2,b.png,a photo,a sketch"])
    argv = ["run", uri, "--out", str(tmp_path / "out"), "--pipeline", "tiny", "--dry-run", "--limit", "1"]
    for item in ISSUE_GRID:
        argv += ["--sweep", item]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "rows: 18\n" in text and "to do: 18\n" in text
    assert "sweep: 18 settings per row: guidance_scale (3) x pnp_attn_t (2) x pnp_f_t (3)" in text
