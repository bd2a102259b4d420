"""The shared class vocabulary (``shared/docs/labels.md``) and each dataset's names for it.

Every cell carries one ``label``: the most specific vocabulary name its dataset gives (a fine class
when known, else a coarse class, else the dataset's own name, kept and reported, never merged).
"""

FINE_TO_COARSE = {
    "basophil": "basophil",
    "eosinophil": "eosinophil",
    "erythroblast": "erythroblast",
    "myeloblast": "blast",
    "promyelocyte": "ig",
    "myelocyte": "ig",
    "metamyelocyte": "ig",
    "neutrophil_band": "neutrophil",
    "neutrophil_segmented": "neutrophil",
    "monocyte": "monocyte",
    "lymphocyte_typical": "lymphocyte",
    "lymphocyte_atypical": "lymphocyte",
    "smudge_cell": "smudge_cell",
}
FINE_CLASSES = tuple(FINE_TO_COARSE)
COARSE_CLASSES = tuple(dict.fromkeys(FINE_TO_COARSE.values())) + ("platelet",)

# The order a differential count lists classes in: mature cells as a smear report gives them, then the
# granulocyte precursors from the most mature, blasts, and the rest.
HAEMATOLOGY_ORDER = (
    "neutrophil_segmented",
    "neutrophil_band",
    "neutrophil",
    "lymphocyte_typical",
    "lymphocyte_atypical",
    "lymphocyte",
    "monocyte",
    "eosinophil",
    "basophil",
    "metamyelocyte",
    "myelocyte",
    "promyelocyte",
    "ig",
    "myeloblast",
    "blast",
    "erythroblast",
    "smudge_cell",
    "platelet",
)

# Matek-19 folder codes. MYO is the myeloblast and MYB the myelocyte; MOB is merged into monocyte
# as the paper does; PMB (bilobed promyelocyte) is kept under its own name, which the paper drops.
MATEK_CODES = {
    "BAS": "basophil",
    "EBO": "erythroblast",
    "EOS": "eosinophil",
    "KSC": "smudge_cell",
    "LYA": "lymphocyte_atypical",
    "LYT": "lymphocyte_typical",
    "MMZ": "metamyelocyte",
    "MOB": "monocyte",
    "MON": "monocyte",
    "MYB": "myelocyte",
    "MYO": "myeloblast",
    "NGB": "neutrophil_band",
    "NGS": "neutrophil_segmented",
    "PMB": "PMB",
    "PMO": "promyelocyte",
}

# Acevedo-20: the file-name prefix gives the subtype; unspecified prefixes stay coarse.
ACEVEDO_PREFIXES = {
    "BA": "basophil",
    "EO": "eosinophil",
    "ERB": "erythroblast",
    "PMY": "promyelocyte",
    "MY": "myelocyte",
    "MMY": "metamyelocyte",
    "IG": "ig",
    "LY": "lymphocyte",
    "MO": "monocyte",
    "SNE": "neutrophil_segmented",
    "BNE": "neutrophil_band",
    "NEUTROPHIL": "neutrophil",
    "PLATELET": "platelet",
}

# Common spellings of class names in class-folder and CSV datasets.
ALIASES = {
    "neutrophils": "neutrophil",
    "segmented_neutrophil": "neutrophil_segmented",
    "band_neutrophil": "neutrophil_band",
    "lymphocytes": "lymphocyte",
    "monocytes": "monocyte",
    "eosinophils": "eosinophil",
    "basophils": "basophil",
    "erythroblasts": "erythroblast",
    "platelets": "platelet",
    "blasts": "blast",
    "immature_granulocyte": "ig",
    "immature_granulocytes": "ig",
    "smudge": "smudge_cell",
}


def normalise(name: str) -> str:
    """Map a free-form class name onto the vocabulary when it is a known spelling of it."""
    key = name.strip().lower().replace(" ", "_").replace("-", "_")
    key = ALIASES.get(key, key)
    if key in FINE_TO_COARSE or key in COARSE_CLASSES:
        return key
    return name.strip()


def coarse_of(label: str) -> str:
    """Coarse class of a label; a coarse or unmapped name is its own coarse class."""
    return FINE_TO_COARSE.get(label, label)


def is_fine(label: str) -> bool:
    return label in FINE_TO_COARSE


def is_known(label: str) -> bool:
    return label in FINE_TO_COARSE or label in COARSE_CLASSES


def haematology_sorted(names) -> list[str]:
    """Class names in differential-count order; names outside the vocabulary follow, alphabetically."""
    rank = {name: index for index, name in enumerate(HAEMATOLOGY_ORDER)}
    return sorted(set(names), key=lambda name: (rank.get(name, len(rank)), name))
