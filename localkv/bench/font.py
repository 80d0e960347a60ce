"""A 3x5 bitmap font (digits, capitals, a little punctuation) for the plot's labels: no font files needed.

Lower case is drawn as upper case; characters without a glyph are drawn as '?'.
"""

from __future__ import annotations

import numpy as np

GLYPHS = {  # five rows of three pixels each, '#' lit
    "0": "### #.# #.# #.# ###", "1": ".#. ##. .#. .#. ###", "2": "### ..# ### #.. ###",
    "3": "### ..# .## ..# ###", "4": "#.# #.# ### ..# ..#", "5": "### #.. ### ..# ###",
    "6": "### #.. ### #.# ###", "7": "### ..# ..# .#. .#.", "8": "### #.# ### #.# ###",
    "9": "### #.# ### ..# ###",
    "A": ".#. #.# ### #.# #.#", "B": "##. #.# ##. #.# ##.", "C": ".## #.. #.. #.. .##",
    "D": "##. #.# #.# #.# ##.", "E": "### #.. ##. #.. ###", "F": "### #.. ##. #.. #..",
    "G": ".## #.. #.# #.# .##", "H": "#.# #.# ### #.# #.#", "I": "### .#. .#. .#. ###",
    "J": "..# ..# ..# #.# .#.", "K": "#.# #.# ##. #.# #.#", "L": "#.. #.. #.. #.. ###",
    "M": "#.# ### ### #.# #.#", "N": "##. #.# #.# #.# #.#", "O": ".#. #.# #.# #.# .#.",
    "P": "##. #.# ##. #.. #..", "Q": ".#. #.# #.# ##. .##", "R": "##. #.# ##. #.# #.#",
    "S": ".## #.. .#. ..# ##.", "T": "### .#. .#. .#. .#.", "U": "#.# #.# #.# #.# ###",
    "V": "#.# #.# #.# #.# .#.", "W": "#.# #.# ### ### #.#", "X": "#.# #.# .#. #.# #.#",
    "Y": "#.# #.# .#. .#. .#.", "Z": "### ..# .#. #.. ###",
    " ": "... ... ... ... ...", ".": "... ... ... ... .#.", ",": "... ... ... .#. #..",
    "-": "... ... ### ... ...", "/": "..# ..# .#. #.. #..", "(": ".#. #.. #.. #.. .#.",
    ")": ".#. ..# ..# ..# .#.", ":": "... .#. ... .#. ...", "=": "... ### ... ### ...",
    "%": "#.# ..# .#. #.. #.#", "+": "... .#. ### .#. ...", "_": "... ... ... ... ###",
    "?": "### ..# .#. ... .#.",
}
WIDTH, HEIGHT = 3, 5


def _glyph(ch: str) -> np.ndarray:
    rows = GLYPHS.get(ch.upper(), GLYPHS["?"]).split()
    return np.array([[c == "#" for c in row] for row in rows])


def text_mask(text: str, scale: int = 2) -> np.ndarray:
    """A boolean (5*scale, 4*len(text)*scale) image of ``text``: glyphs 3 wide with 1 pixel between them."""
    if not text:
        return np.zeros((HEIGHT * scale, 0), dtype=bool)
    cells = [np.pad(_glyph(ch), ((0, 0), (0, 1))) for ch in text]
    return np.kron(np.concatenate(cells, axis=1), np.ones((scale, scale), dtype=bool)).astype(bool)
