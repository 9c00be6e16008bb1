"""The report page: :mod:`data` and :mod:`sheets` structures through the Jinja2 template.

Autoescape is on for every value; credentials are removed from every value as it is written,
except :class:`~fundus_batch.report.formatting.Verbatim` text (image ids and the links built
from them, which name files under OUT and would break if redacted). The SVG plots are the only
markup passed in, and :mod:`plots` builds them as XML elements.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import cache

import jinja2
from markupsafe import Markup

from fundus_batch import __version__
from fundus_batch.io import storage
from fundus_batch.output import RUN_JSON
from fundus_batch.report import plots
from fundus_batch.report.data import ReportData
from fundus_batch.report.formatting import Verbatim, fmt
from fundus_batch.report.sheets import ContactSheets

__all__ = ["FIGURES_DIR", "SECTION_IDS", "SECTION_TITLES", "TEMPLATE", "render_page"]

TEMPLATE = "report.html.j2"
FIGURES_DIR = "report_figures"
SECTION_IDS = ("summary", "contact-sheets", "metrics", "downstream", "failures", "throughput")
SECTION_TITLES = ("Summary", "Contact sheets", "Metrics", "Downstream", "Failures", "Throughput")


def _finalize(value: object) -> object:
    """Every value written by the template, with credentials removed (markup and ids are left
    alone; autoescape still escapes ids)."""
    if isinstance(value, Markup | Verbatim):
        return value
    return storage.redact(str(value))


@cache
def environment() -> jinja2.Environment:
    """The template environment: package templates, autoescape on, undefined names an error."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("fundus_batch.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        finalize=_finalize,
        keep_trailing_newline=True,
    )
    env.filters["fmt"] = fmt
    return env


def render_page(
    data: ReportData, sheets: ContactSheets, svgs: Sequence[str], generated: float | None = None
) -> str:
    """The HTML page; ``svgs`` are standalone SVG documents from :mod:`plots`."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(generated))
    template = environment().get_template(TEMPLATE)
    return template.render(
        data=data,
        sheets=sheets,
        plots=[Markup(plots.inline(svg)) for svg in svgs],  # built by ElementTree: escaped
        sections=list(zip(SECTION_IDS, SECTION_TITLES, strict=True)),
        run_json=RUN_JSON,
        version=__version__,
        generated=stamp,
        figures_dir=FIGURES_DIR,
    )
