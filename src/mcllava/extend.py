"""Adding concepts to a trained bank: what is checked, which photos serve as negatives, and the extended bank.

`train.personalize(..., extend=bank, extend_concepts=old_set)` trains only the new concepts' rows. The bank's
rows are written into the model and never train, so they come out bit-identical; the old concepts' photos (their
concept folder) join the catalogue as the new concepts' negatives, and the old concepts are asked about as many
times as the new concepts have photos (`training_data._frozen_samples`), so the cost follows the new concepts.
"""

from __future__ import annotations

from dataclasses import replace

from .bank import ConceptBank
from .concepts import ConceptSet
from .errors import McLlavaError
from .training_data import CatalogEntry

OLD_PREFIX = "_old/"  # catalogue keys of the bank's concepts' photos (never clash with the new folder's keys)


def check_extension(
    bank: ConceptBank,
    concepts: ConceptSet,
    old_concepts: ConceptSet | None,
    base_hash: str,
    n_ordinary: int,
    k: int,
    introduce: str,
) -> ConceptSet:
    """Refuse an extension that cannot work; return the bank's concepts (from `old_concepts`) in the bank's order."""
    where = bank.path if bank.path is not None else "(unsaved bank)"
    bank.check_base(base_hash, n_ordinary)
    again = [c.id for c in concepts if c.id in bank.concept_ids]
    if again:
        raise McLlavaError(
            f"concept{'s' if len(again) > 1 else ''} {', '.join(again)} already in bank {where}: "
            "give the new concept another id, or train a new bank"
        )
    if k != bank.k:
        raise McLlavaError(
            f"bank {where} has k={bank.k} soft tokens per concept; its new concepts must too (not k={k})"
        )
    trained_as = bank.recipe.get("introduce", "all")
    if introduce != trained_as:
        raise McLlavaError(
            f"bank {where} was trained with introduce={trained_as}; extend it the same way (not {introduce})"
        )
    if old_concepts is None:
        raise McLlavaError(
            f"extending bank {where} needs its concepts' photos as the new concepts' negatives: "
            "pass their concept folder (--concepts-of-bank DIR)"
        )
    by_id = {c.id: c for c in old_concepts}
    missing = [cid for cid in bank.concept_ids if cid not in by_id]
    if missing:
        raise McLlavaError(
            f"{old_concepts.root} is not the concept folder of bank {where}: it lacks {', '.join(missing)}"
        )
    keep = set(bank.concept_ids)
    return ConceptSet(
        old_concepts.root,
        [by_id[cid] for cid in bank.concept_ids],
        [m for m in old_concepts.multi if set(m.present) <= keep],
    )


def old_catalog(old: ConceptSet) -> list[CatalogEntry]:
    """Every photo of the bank's concepts (theirs and their group photos), as negatives for the new ones."""
    entries = [
        CatalogEntry(
            f"{OLD_PREFIX}{c.id}/{i}", str(im.path), str(im.mask_path) if im.mask_path else None, frozenset([c.id])
        )
        for c in old
        for i, im in enumerate(c.images)
    ]
    entries += [
        CatalogEntry(f"{OLD_PREFIX}_multi/{j}", str(m.path), None, frozenset(m.present))
        for j, m in enumerate(old.multi)
    ]
    return entries


def extended_bank(bank: ConceptBank, new: ConceptBank) -> ConceptBank:
    """The bank's concepts followed by the new ones: the bank's tensors are copied as they are (bit-identical); the
    recipe is the extension's, with the bank's own under `extends`, and so are the metrics."""
    merged = bank.merge(new)
    return replace(
        merged,
        recipe={**new.recipe, "extends": {"concepts": bank.concept_ids, "recipe": bank.recipe}},
        metrics={**new.metrics, "extends": bank.metrics},
    )
