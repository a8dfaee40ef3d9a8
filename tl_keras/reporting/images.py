"""The one renderer of tl_keras's pictures: TensorBoard's images and the PNGs in eval/ look the same
because both come from here. PIL draws them (it is a dependency anyway, and its font is legible);
every function returns a uint8 RGB array [H, W, 3], and `encode_png` turns one into a file's bytes."""

import functools
import io
import math
import typing

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


# Line charts: CHART_SIZE pixels unless asked; lines take CHART_COLORS in turn unless they name a colour.
CHART_SIZE = (640, 400)
CHART_COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189))
LIGHT_BLUE = (174, 199, 232)
TICK = 4
MAX_TICKS = 10


class ChartLine(typing.NamedTuple):
    """One line of a `line_chart`: the points (xs[i], ys[i]), in order; a non-finite point (or one at
    x <= 0 on a log axis) breaks the line there."""
    label: str
    xs: typing.Sequence
    ys: typing.Sequence
    color: tuple | None = None
    width: int = 1


def line_chart(lines, title: str = "", x_label: str = "", y_label: str = "", log_x: bool = False,
               y_limits: tuple | None = None, marker: float | None = None, marker_label: str = "",
               size: tuple = CHART_SIZE) -> np.ndarray:
    """Lines (ChartLines, or tuples of their fields) on shared axes, with tick values, grid, a legend
    under the title, and an optional dashed vertical marker at x=`marker` labelled `marker_label`.

    `y_limits` fixes the y range; points beyond it are drawn on its edge, so that one outlier (a loss
    that exploded) does not flatten the rest. By default the range is the data's. `log_x` puts x on a
    log scale with ticks at powers of ten."""
    lines = [ChartLine(*line) for line in lines]
    font = _font()
    to_x = np.log10 if log_x else (lambda v: v)
    points = [_chart_points(line, log_x) for line in lines]
    xs = np.concatenate([p[0] for p in points] + [np.zeros(0)])
    ys = np.concatenate([p[1] for p in points] + [np.zeros(0)])
    if not xs.size:
        return text_image(f"{title}: nothing to plot" if title else "Nothing to plot")
    x_range = [float(to_x(xs.min())), float(to_x(xs.max()))]
    if marker is not None and (marker > 0 or not log_x):
        x_range = [min(x_range[0], float(to_x(marker))), max(x_range[1], float(to_x(marker)))]
    x_range = _widened(*x_range)
    y_range = _widened(*(y_limits if y_limits is not None else (float(ys.min()), float(ys.max()))))
    x_ticks = _decade_ticks(*x_range) if log_x else _nice_ticks(*x_range)
    x_tick_labels = [_tick_label(10.0 ** t if log_x else t, log_x) for t in x_ticks]
    y_ticks = _nice_ticks(*y_range)
    y_tick_labels = [_tick_label(t) for t in y_ticks]

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    width, height = size
    top = PAD + (LINE_HEIGHT if title else 0) + LINE_HEIGHT + PAD
    left = (PAD + (LINE_HEIGHT + PAD if y_label else 0) + TICK + PAD
            + max(int(draw.textlength(label, font=font)) for label in y_tick_labels))
    right = width - max(3 * PAD, int(draw.textlength(x_tick_labels[-1], font=font)) // 2 + PAD)
    bottom = height - (TICK + 2 * PAD + LINE_HEIGHT + (LINE_HEIGHT if x_label else 0))

    def x_pixel(value):
        return left + (value - x_range[0]) / (x_range[1] - x_range[0]) * (right - left)

    def y_pixel(value):
        value = min(max(value, y_range[0]), y_range[1])
        return bottom - (value - y_range[0]) / (y_range[1] - y_range[0]) * (bottom - top)

    for tick, label in zip(x_ticks, x_tick_labels):
        x = x_pixel(tick)
        draw.line([(x, top), (x, bottom)], fill=GRID_LINE)
        draw.line([(x, bottom), (x, bottom + TICK)], fill=INK)
        draw.text((x, bottom + TICK + PAD), label, fill=INK, font=font, anchor="mt")
    for tick, label in zip(y_ticks, y_tick_labels):
        y = y_pixel(tick)
        draw.line([(left, y), (right, y)], fill=GRID_LINE)
        draw.line([(left - TICK, y), (left, y)], fill=INK)
        draw.text((left - TICK - PAD, y), label, fill=INK, font=font, anchor="rm")
    draw.rectangle([left, top, right, bottom], outline=INK)
    for k, (line, (line_xs, line_ys, breaks)) in enumerate(zip(lines, points)):
        color = tuple(line.color) if line.color is not None else CHART_COLORS[k % len(CHART_COLORS)]
        pixels = [(x_pixel(to_x(x)), y_pixel(y)) for x, y in zip(line_xs, line_ys)]
        for segment in np.split(np.arange(len(pixels)), breaks):
            if len(segment) > 1:
                draw.line([pixels[i] for i in segment], fill=color, width=line.width, joint="curve")
            elif len(segment) == 1:
                x, y = pixels[segment[0]]
                radius = max(1, line.width)
                draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=color)
    if marker is not None and (marker > 0 or not log_x):
        x = x_pixel(to_x(marker))
        for y in range(top, bottom, 7):
            draw.line([(x, y), (x, min(y + 4, bottom))], fill=WRONG, width=1)
        if marker_label:
            text_width = draw.textlength(marker_label, font=font)
            anchor_x = x + PAD if x + PAD + text_width <= right - PAD else x - PAD - text_width
            box = [anchor_x - 1, top + PAD - 1, anchor_x + text_width + 1, top + PAD + LINE_HEIGHT]
            draw.rectangle(box, fill="white")
            draw.text((anchor_x, top + PAD), marker_label, fill=WRONG, font=font)

    if title:
        draw.text((PAD, PAD), title, fill=INK, font=font)
    legend_x, legend_y = left, top - PAD - LINE_HEIGHT
    for k, line in enumerate(lines):
        color = tuple(line.color) if line.color is not None else CHART_COLORS[k % len(CHART_COLORS)]
        middle = legend_y + LINE_HEIGHT // 2
        draw.line([(legend_x, middle), (legend_x + 16, middle)], fill=color, width=max(2, line.width))
        draw.text((legend_x + 20, legend_y), line.label, fill=INK, font=font)
        legend_x += 20 + int(draw.textlength(line.label, font=font)) + 3 * PAD
    if x_label:
        draw.text(((left + right) / 2, height - PAD), x_label, fill=INK, font=font, anchor="md")
    if y_label:
        label = Image.new("RGB", (int(draw.textlength(y_label, font=font)) + 2, LINE_HEIGHT), "white")
        ImageDraw.Draw(label).text((1, 0), y_label, fill=INK, font=font)
        label = label.rotate(90, expand=True)
        image.paste(label, (PAD, int((top + bottom - label.height) / 2)))
    return np.asarray(image)


def _chart_points(line: ChartLine, log_x: bool):
    """(xs, ys, breaks) of a line's drawable points, where breaks are the indices into them at which
    a dropped point interrupted the line."""
    xs = np.asarray(line.xs, np.float64).reshape(-1)
    ys = np.asarray(line.ys, np.float64).reshape(-1)
    if xs.shape != ys.shape:
        raise ValueError(f"A chart line needs as many xs as ys. Received: label={line.label!r}, "
                         f"len(xs)={xs.size}, len(ys)={ys.size}")
    keep = np.isfinite(xs) & np.isfinite(ys) & ((xs > 0) if log_x else True)
    kept_before = np.cumsum(keep) - keep  # For each point, how many kept points precede it.
    breaks = np.unique(kept_before[~keep])
    return xs[keep], ys[keep], breaks[(breaks > 0) & (breaks < keep.sum())]


def _widened(low: float, high: float) -> tuple:
    """An axis range that is not empty: a single value gets half a unit (or half itself) each side."""
    if high > low:
        return low, high
    half = 0.5 * abs(low) or 0.5
    return low - half, high + half


def _nice_ticks(low: float, high: float, count: int = 6) -> list:
    """Round values (1, 2 or 5 times a power of ten apart) within [low, high], about `count` of them."""
    raw = (high - low) / max(1, count - 1)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(low / step - 1e-9)
    ticks = [k * step for k in range(first, math.floor(high / step + 1e-9) + 1)]
    return [0.0 if abs(t) < step * 1e-9 else t for t in ticks]


def _decade_ticks(low: float, high: float) -> list:
    """Powers of ten (as exponents) within [low, high], thinned to at most MAX_TICKS; a range under a
    decade gets round values instead."""
    decades = list(range(math.ceil(low - 1e-9), math.floor(high + 1e-9) + 1))
    if len(decades) < 2:
        return [math.log10(t) for t in _nice_ticks(10.0 ** low, 10.0 ** high) if t > 0]
    every = math.ceil(len(decades) / MAX_TICKS)
    return [d for d in decades if d % every == 0]


def _tick_label(value: float, log: bool = False) -> str:
    if log and value > 0 and abs(math.log10(value) - round(math.log10(value))) < 1e-9:
        return f"1e{round(math.log10(value))}"
    return f"{value:.3g}"


def encode_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


# Reliability diagram: a square plot of RD_SIDE pixels, with RD_MARGIN for the axis labels.
RD_SIDE, RD_MARGIN = 300, 30


def reliability_diagram(before: list, after: list | None = None, title: str = "") -> np.ndarray:
    """Accuracy against confidence per bin (reliability_bins' dicts): bars for `after` (the calibrated
    probabilities) and a red line for `before`, over the diagonal of perfect calibration. A bar
    below the diagonal is overconfidence. Each series' ECE is written in the legend."""
    series = [("before", before, WRONG)] + ([("after", after, tuple(BLUE.astype(int)))] if after else [])
    font = _font()
    side, left, top = RD_SIDE, RD_MARGIN + 2 * PAD, 2 * PAD + (len(series) + 1) * LINE_HEIGHT
    image = Image.new("RGB", (left + side + 3 * PAD, top + side + RD_MARGIN), "white")
    draw = ImageDraw.Draw(image)

    def point(confidence, accuracy):
        return left + confidence * side, top + (1 - accuracy) * side

    draw.text((PAD, PAD), title or "reliability: accuracy against confidence", fill=INK, font=font)
    for row, (name, bins, color) in enumerate(series, start=1):
        total = sum(b["count"] for b in bins)
        ece = sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"])
        draw.text((PAD, PAD + row * LINE_HEIGHT), f"{name}: ECE {ece:.4f}", fill=color, font=font)
    if after:
        for b in after:
            if b["count"]:
                draw.rectangle([point(b["lower"], b["accuracy"]), point(b["upper"], 0)],
                               fill=(174, 199, 232), outline=tuple(BLUE.astype(int)))
    draw.line([point(0, 0), point(1, 1)], fill=(150, 150, 150), width=1)
    draw.rectangle([point(0, 1), point(1, 0)], outline=INK)
    line = [point(b["confidence"], b["accuracy"]) for b in before if b["count"]]
    if len(line) > 1:
        draw.line(line, fill=WRONG, width=2)
    for x, y in line:
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=WRONG)
    for tick in (0.0, 0.5, 1.0):
        x, y = point(tick, tick)
        draw.text((x, top + side + PAD), f"{tick:g}", fill=INK, font=font, anchor="mt")
        draw.text((left - PAD, y), f"{tick:g}", fill=INK, font=font, anchor="rm")
    draw.text((left + side // 2, top + side + PAD + LINE_HEIGHT), "confidence", fill=INK, font=font,
              anchor="mt")
    return np.asarray(image)


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
