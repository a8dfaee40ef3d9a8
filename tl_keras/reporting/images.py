"""The one renderer of tl_keras's pictures: TensorBoard's images and the PNGs in eval/ look the same
because both come from here. PIL draws them (it is a dependency anyway, and its font is legible);
every function returns a uint8 RGB array [H, W, 3], and `encode_png` turns one into a file's bytes."""

import functools
import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BLUE = np.array([31, 119, 180], np.float64)  # A confusion cell holding its whole row; an empty one is white.
INK, WRONG = (0, 0, 0), (200, 30, 30)
GRID_LINE = (220, 220, 220)
FONT_SIZE = 11
LINE_HEIGHT = 13
PAD = 4
# Tiles: small images are enlarged by a whole factor (nearest neighbour, pixels stay sharp) to at least
# MIN_TILE a side; large ones are shrunk to MAX_TILE, so a grid of full-size photos stays viewable.
MIN_TILE, MAX_TILE = 96, 256
# Confusion matrix: CM_LABEL_WIDTH + n * cell + PAD wide, CM_HEADER + n * cell + PAD high. Cells shrink
# to keep the matrix within CM_MAX_SIDE pixels (1 pixel each for 1000 classes); labels and counts are
# drawn only while they fit in a cell.
CM_LABEL_WIDTH = 120
CM_HEADER = 2 * LINE_HEIGHT + PAD
CM_MAX_CELL, CM_MAX_SIDE = 40, 1600
CM_MIN_OUTLINED_CELL = 6


def confusion_cell_size(num_classes: int) -> int:
    return max(1, min(CM_MAX_CELL, CM_MAX_SIDE // max(1, num_classes)))


def confusion_matrix_image(matrix: np.ndarray, class_names, title: str = "") -> np.ndarray:
    """Rows are true classes, columns predicted ones, each cell shaded by its share of the row (so a
    rare class reads as clearly as a common one), with its count while counts fit. Rows are labelled
    'index name' and columns by index while cells are tall and wide enough."""
    matrix = np.asarray(matrix)
    n = len(class_names)
    cell = confusion_cell_size(n)
    font = _font()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_rows = cell >= LINE_HEIGHT
    label_columns = measure.textlength(str(n - 1), font=font) <= cell - 2
    counts = cell >= LINE_HEIGHT + 4 and (
        measure.textlength(str(int(matrix.max(initial=0))), font=font) <= cell - 4)
    heading = (f"{title}: " if title else "") + "rows true, columns predicted"
    left = CM_LABEL_WIDTH if label_rows else PAD
    width = max(left + n * cell + PAD, int(measure.textlength(heading, font=font)) + 2 * PAD)
    canvas = np.full((CM_HEADER + n * cell + PAD, width, 3), 255, np.uint8)
    rows = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, rows, out=np.zeros(matrix.shape, np.float64), where=rows > 0)
    # Cells are painted as one array (a thousand classes are a million cells), text drawn over them.
    colors = np.round(255 + (BLUE - 255) * shares[..., None]).astype(np.uint8)
    cells = colors.repeat(cell, axis=0).repeat(cell, axis=1)
    if cell >= CM_MIN_OUTLINED_CELL:
        edge = np.isin(np.arange(n * cell) % cell, (0, cell - 1))
        cells[edge] = GRID_LINE
        cells[:, edge] = GRID_LINE
    canvas[CM_HEADER:CM_HEADER + n * cell, left:left + n * cell] = cells
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    draw.text((PAD, PAD), heading, fill=INK, font=font)
    for i in range(n if label_rows or label_columns or counts else 0):
        top = CM_HEADER + i * cell
        if label_rows:
            label = _fit(draw, f"{i} {class_names[i]}", CM_LABEL_WIDTH - 2 * PAD, font)
            draw.text((PAD, top + (cell - LINE_HEIGHT) // 2), label, fill=INK, font=font)
        if label_columns:
            draw.text((left + i * cell + cell // 2, CM_HEADER - PAD), str(i), fill=INK, font=font,
                      anchor="mb")
        for j in range(n if counts else 0):
            draw.text((left + j * cell + cell // 2, top + cell // 2), str(matrix[i, j]),
                      fill="white" if shares[i, j] > 0.5 else INK, font=font, anchor="mm")
    return np.asarray(image)


def captioned_grid(images, captions) -> np.ndarray:
    """Images (uint8 [H, W, 1|3|4], any sizes) in a near-square grid of equal square tiles, each with
    its caption below: a list of (text, color) lines, cut with an ellipsis to the tile's width."""
    if not len(images):
        raise ValueError(f"A grid needs at least one image. Received: images={images!r}")
    tile = tile_size(images)
    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    lines = max((len(c) for c in captions), default=0)
    cell_w, cell_h = tile + PAD, tile + lines * LINE_HEIGHT + PAD
    grid = Image.new("RGB", (columns * cell_w + PAD, rows * cell_h + PAD), "white")
    draw = ImageDraw.Draw(grid)
    font = _font()
    for k, (image, caption) in enumerate(zip(images, captions)):
        left, top = PAD + (k % columns) * cell_w, PAD + (k // columns) * cell_h
        picture = _scaled(np.asarray(image), tile)
        grid.paste(picture, (left + (tile - picture.width) // 2, top + (tile - picture.height) // 2))
        for line, (text, color) in enumerate(caption):
            draw.text((left, top + tile + line * LINE_HEIGHT), _fit(draw, text, tile, font), fill=color,
                      font=font)
    return np.asarray(grid)


def tile_size(images) -> int:
    """The side of a grid's tiles: the largest image's, enlarged by a whole factor to MIN_TILE, at most
    MAX_TILE (32 -> 96, 224 -> 224, a 4000-pixel photo -> 256)."""
    side = max(max(np.shape(image)[:2]) for image in images)
    return min(MAX_TILE, side * math.ceil(MIN_TILE / side))


def misclassified_grid(images, true_names, predicted_names, confidences) -> np.ndarray:
    """Mistakes as captioned tiles: the true class, then the predicted one and the model's confidence
    in it. No mistakes still make a picture, one that says so."""
    if not len(images):
        return text_image("No misclassified examples")
    captions = [[(f"true: {true}", INK), (f"pred: {predicted}", WRONG),
                 (f"confidence {confidence:.0%}", WRONG)]
                for true, predicted, confidence in zip(true_names, predicted_names, confidences)]
    return captioned_grid(images, captions)


def text_image(text: str) -> np.ndarray:
    """One line of text on white: a picture where there is nothing else to show."""
    font = _font()
    width = int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(text, font=font))
    image = Image.new("RGB", (width + 2 * PAD, LINE_HEIGHT + 2 * PAD), "white")
    ImageDraw.Draw(image).text((PAD, PAD), text, fill=INK, font=font)
    return np.asarray(image)


def encode_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _scaled(image: np.ndarray, tile: int) -> Image.Image:
    """`image` fitted into a tile x tile square, aspect kept: enlarged by a whole factor, or shrunk by
    averaging, so that neither blurs small images nor aliases large ones."""
    image = np.asarray(image, np.uint8)
    if image.ndim == 2:
        image = image[..., None]
    image = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3]
    height, width = image.shape[:2]
    if max(height, width) <= tile:
        factor = tile // max(height, width)
        return Image.fromarray(np.ascontiguousarray(image.repeat(factor, axis=0).repeat(factor, axis=1)))
    scale = tile / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return Image.fromarray(np.ascontiguousarray(image)).resize(size, Image.Resampling.BOX)


@functools.cache
def _font():
    return ImageFont.load_default(size=FONT_SIZE)


def _fit(draw, text: str, width: int, font) -> str:
    """Cut `text` with an ellipsis until it fits in `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"
