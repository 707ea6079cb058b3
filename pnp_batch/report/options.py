"""The `pnp-batch report` options that choose rows (light at import: no table or image library)."""

from __future__ import annotations

import argparse


def add_report_args(rp: argparse.ArgumentParser) -> None:
    rp.add_argument("--sort", default=None, metavar="KEY",
                    help="a column of the latest view (a metric such as structure_dist, clip_score, clip_gain, or any "
                    "numeric column) to choose and order the rows of the contact sheet by")
    pick = rp.add_mutually_exclusive_group()
    pick.add_argument("--worst", type=int, default=None, metavar="N",
                      help="the N worst rows by --sort (highest structure_dist; lowest clip_score / clip_gain; "
                      "highest for any other column)")
    pick.add_argument("--best", type=int, default=None, metavar="N", help="the N best rows by --sort")
    pick.add_argument("--sample", type=int, default=None, metavar="N",
                      help="N rows drawn at random (--seed), ordered by --sort when given")
    rp.add_argument("--seed", type=int, default=0, help="seed of --sample (default 0)")
    rp.add_argument("--where", default=None, metavar="EXPR",
                    help="SQL boolean expression over the latest view, as for export (e.g. \"status = 'ok'\")")
    rp.add_argument("--page-size", type=int, default=100, help="rows per page of OUT/report/index.html (default 100)")
    rp.add_argument("--no-index", action="store_true", help="do not write the browsable page OUT/report/index.html")
