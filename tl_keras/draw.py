"""Just enough raster drawing for the report's PNGs (labelled cells, captioned tiles) in numpy,
so the report needs no plotting or imaging dependency. Pixels are uint8 RGB arrays [H, W, 3]."""

import numpy as np

# A 3x5 pixel font: five rows per glyph, each row a digit whose 3 bits are its pixels, left = 4.
_GLYPHS = {
    "A": "25755", "B": "65656", "C": "34443", "D": "65556", "E": "74647", "F": "74644", "G": "34553",
    "H": "55755", "I": "72227", "J": "11152", "K": "55655", "L": "44447", "M": "57755", "N": "65555",
    "O": "25552", "P": "65644", "Q": "25563", "R": "65655", "S": "34216", "T": "72222", "U": "55557",
    "V": "55552", "W": "55775", "X": "55255", "Y": "55222", "Z": "71247",
    "0": "75557", "1": "26227", "2": "61247", "3": "61216", "4": "55711", "5": "74616", "6": "34757",
    "7": "71222", "8": "75757", "9": "75716",
    " ": "00000", ".": "00002", ",": "00024", ":": "02020", "-": "00700", "_": "00007", "/": "11244",
    "%": "51245", "(": "12221", ")": "42224", "?": "61202", "=": "07070", "+": "02720", "'": "22000",
    "<": "12421", ">": "42124", "[": "32223", "]": "62226",
}
GLYPH_WIDTH, GLYPH_HEIGHT = 3, 5

WHITE = (255, 255, 255)
BLACK = (0, 0, 0)


def _glyph(char: str) -> np.ndarray:
    rows = _GLYPHS.get(char.upper(), _GLYPHS["?"])
    return np.array([[int(row) >> (2 - col) & 1 for col in range(3)] for row in rows], dtype=bool)


def text_size(text: str, scale: int = 1) -> tuple[int, int]:
    """(height, width) in pixels: glyphs 3 wide with a 1-pixel gap, times scale."""
    return GLYPH_HEIGHT * scale, max(0, (GLYPH_WIDTH + 1) * len(text) - 1) * scale


def text_mask(text: str, scale: int = 1) -> np.ndarray:
    """Boolean [H, W] mask of `text`; letters print as capitals, unknown characters as '?'."""
    mask = np.zeros(text_size(text), dtype=bool)
    for i, char in enumerate(text):
        mask[:, i * (GLYPH_WIDTH + 1):i * (GLYPH_WIDTH + 1) + GLYPH_WIDTH] = _glyph(char)
    return np.kron(mask, np.ones((scale, scale), dtype=bool)) if scale > 1 else mask


def draw_text(canvas: np.ndarray, text: str, top: int, left: int, color=BLACK, scale: int = 1):
    """Draw `text` in place, clipped to the canvas."""
    mask = text_mask(text, scale)
    mask = mask[:max(0, canvas.shape[0] - top), :max(0, canvas.shape[1] - left)]
    region = canvas[top:top + mask.shape[0], left:left + mask.shape[1]]
    region[mask] = color


def fit(text: str, max_chars: int) -> str:
    """Shorten text to at most max_chars, marking the cut with '.'."""
    return text if len(text) <= max_chars else text[:max(0, max_chars - 1)] + "."
