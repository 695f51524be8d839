"""Model cards (the Hub repo's ``README.md``) rendered from ``weights/card_template.md`` and the manifest.

The template uses ``{{field}}`` placeholders; rendering fails if a placeholder has no value, so a template
change can never publish a card with holes in it.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, Optional, Union

from .hub import resource_path
from .manifest import Manifest, WeightEntry

__all__ = ["render_template", "license_text", "card_fields", "render_card"]

_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def render_template(template: str, fields: Dict[str, Any]) -> str:
    """Replace every ``{{key}}`` in ``template`` with ``str(fields[key])``.

    Raises:
        KeyError: a placeholder has no value in ``fields`` (all missing names are listed).
    """
    missing = sorted({m.group(1) for m in _PLACEHOLDER.finditer(template)} - set(fields))
    if missing:
        raise KeyError(f"model card template needs values for {missing}")
    return _PLACEHOLDER.sub(lambda m: str(fields[m.group(1)]), template)


# the MIT licence's permission notice (its standard text, https://opensource.org/license/mit), which the licence
# requires in all copies: found by an audit, the cards only linked it
MIT_PERMISSION_NOTICE = (
    'Permission is hereby granted, free of charge, to any person obtaining a copy of this software and associated '
    'documentation files (the "Software"), to deal in the Software without restriction, including without limitation '
    'the rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies of the Software, and '
    'to permit persons to whom the Software is furnished to do so, subject to the following conditions:',
    'The above copyright notice and this permission notice shall be included in all copies or substantial portions '
    'of the Software.',
    'THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT LIMITED TO '
    'THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE '
    'AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF '
    'CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER '
    'DEALINGS IN THE SOFTWARE.',
)


def license_text(family: Dict[str, Any]) -> str:
    """The licence paragraph of a card, from a manifest family record."""
    head = (f"{family['license_name']} (`{family['license']}`), {family['copyright']}. "
            f"Full text: {family['license_url']}.")
    if family["commercial_use"] and family["license"] == "mit":  # the notice itself must travel with every copy
        return (f"{head}\n\nThe weights are redistributed under the same licence, whose notice follows; keep it with "
                f"any copy.\n\n> {family['copyright']}\n>\n> " + "\n>\n> ".join(MIT_PERMISSION_NOTICE))
    if family["commercial_use"]:
        return (f"{head}\n\nThe weights are redistributed under the same licence; keep the copyright notice and the "
                "permission notice with any copy.")
    return (f"{head}\n\n**Non-commercial use only.** These weights, and any weights derived from them (conversions, "
            "fine-tunes), may be used and shared for non-commercial purposes only, with attribution, and under the "
            "same licence (share-alike). Commercial use needs a licence from the copyright holder.")


def _owners_license(entry: Any) -> str:
    """The licence paragraph of weights the manifest knows no licence for (an architecture without a release, or
    weights of the owner's own training whose licence was given with ``vitzoo convert --license``)."""
    if entry.license != "other":
        return (f"`{entry.license}`, as stated by the owner of these weights when converting them (`vitzoo convert "
                f"--license`). They are not a release of `{entry.model}` that the weights manifest records (tag "
                f"`{entry.tag}`), so the licence of the family's released weights does not apply to them; the owner "
                f"answers for this licence, and weights converted or fine-tuned from a release must keep that "
                f"release's licence instead.")
    return (f"Set by the owner of these weights. `{entry.model}` has no released weights, so these come from someone's "
            f"own training; the licence of the family's released weights does not apply to them. State the licence "
            f"here (and in the `license:` field above, now `{entry.license}`) before publishing.")


def _number(value: Optional[float], unit: str = "") -> str:
    if value is None:
        return "not reported"
    for suffix, scale in (("G", 1e9), ("M", 1e6)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{suffix}{unit}"
    return f"{value:g}{unit}"


def card_fields(
    entry: WeightEntry,
    manifest: Manifest,
    *,
    source: Optional[str] = None,
    source_sha256: Optional[str] = None,
    params: Optional[int] = None,
    flops: Optional[int] = None,
    input_size: Optional[tuple] = None,
    repo_id: Optional[str] = None,
    dims_json: Optional[str] = None,
    num_classes: Optional[int] = None,
) -> Dict[str, Any]:
    """Collect the template's values: manifest facts, overridden by what conversion measured.

    Args:
        entry: the manifest entry of the weight.
        manifest: the manifest (for the family's paper and licence facts).
        source: the file or URL actually converted (default: ``entry.source_url``).
        source_sha256: its sha256 (default: ``entry.source_sha256``).
        params: parameter count measured on the converted model.
        flops: FLOPs (multiply-adds) counted on the converted model; None -> the reported number.
        input_size: (C, H, W) the FLOPs were counted at.
        repo_id: the Hub repo the card is for (default: ``entry.hub_repo``).
        dims_json: NViT per-block dims (JSON) to list on the card.
        num_classes: the converted model's classifier size (default: the release's, 1000). The front matter names
            ImageNet-1k as the dataset only for a 1000-class classifier: another (a fine-tune, or none) was trained
            on data the file does not tell, so it names none.
    """
    family = manifest.family(entry.model)
    metrics = entry.metrics
    params_text = _number(params if params is not None else metrics["params"])
    params_text += " (counted on the converted model)" if params is not None else " (reported)"
    if flops is not None:
        flops_text = f"{_number(flops)} multiply-adds (fvcore on the inference-fused model, batch 1)"
    elif metrics["flops"] is not None:
        flops_text = f"{_number(metrics['flops'])} (reported; {family['flops_note']})"
    else:
        flops_text = "not reported (convert without --no-flops to count them)"
    size = input_size or (3, metrics["img_size"], metrics["img_size"])
    pct = lambda v: "not reported" if v is None else f"{v}%"  # noqa: E731  as reported: 91.0 stays 91.0
    dims = f"- **Per-block dims (NViT):** `{dims_json}`\n" if dims_json else ""
    datasets = "datasets:\n- imagenet-1k\n" if num_classes in (None, 1000) else ""
    return {
        "license": entry.license,
        "family": entry.family,
        "name": entry.name,
        "model": entry.model,
        "tag": entry.tag,
        "paper": family["paper"],
        "arxiv": family["arxiv"],
        "authors": family["authors"],
        "venue": family["venue"],
        "code_url": family["code_url"],
        "source_url": source or entry.source_url,
        "source_sha256": source_sha256 or entry.source_sha256 or "unknown",
        "params": params_text,
        "flops": flops_text,
        "input_size": " x ".join(str(s) for s in size),
        "top1": pct(metrics["top1"]),
        "top5": pct(metrics["top5"]),
        "metrics_source": metrics["source"],
        "dims": dims,
        "datasets": datasets,
        "repo_id": repo_id or entry.hub_repo or "ORG/NAME",
        "license_text": _license_paragraph(entry, manifest, family),
    }


def _license_paragraph(entry: WeightEntry, manifest: Manifest, family: Dict[str, Any]) -> str:
    if entry.license != family["license"]:
        return _owners_license(entry)
    if manifest.find(entry.model, entry.tag) is not None:
        return license_text(family)
    # weights of a released architecture that are not the release (a fine-tune, or a file that is not the release's):
    # a conversion or fine-tune of the release must keep its licence, so it is kept, but it may be someone's own
    # training, which the release's copyright line does not cover (found by an audit)
    return (f"These weights are not the release of `{entry.model}` that the weights manifest records (tag "
            f"`{entry.tag}`). Weights converted or fine-tuned from the released ones keep the release's licence, "
            f"which is therefore given here:\n\n{license_text(family)}\n\nIf these weights are your own training, "
            f"not derived from the release, that licence and copyright do not apply to them: state yours here, in the "
            f"`license:` field above, in `config.json` and in the weights' metadata before publishing.")


def render_card(fields: Dict[str, Any], template: Union[str, Path, None] = None) -> str:
    """Render the card; ``template`` is a path (default: the packaged ``weights/card_template.md``)."""
    path = Path(template) if template is not None else resource_path("card_template.md")
    return render_template(path.read_text(encoding="utf-8"), fields)
