"""Picture PQCL at work on one image: where a query crop lies in the two global views,
where its query tokens look, and whether the student's prototypes match the teacher's.

    python visualize.py                                          # random init, held-out embedded image 0
    python visualize.py --checkpoint runs/embedded/checkpoint.pth --index 0 1 2
    python visualize.py --checkpoint CKPT --image cat.jpg dog.png --seed 3 --out runs/pictures

One PNG per image in --out, named after the image. Row 1 is global view A, row 2 view B,
each as the networks see it (cropped, resized, flipped, colour-jittered; unmasked):

    query crop  | view + query   | attention of    | teacher      | student prototypes
    source+boxes| crop footprint | query patch 1..k| prototypes   | from this view

- query crop: the pixels the teacher sees, its patch grid, the marked patches 1..k;
  below it the source image with the boxes of views A, B and the query crop Q.
- footprint (cyan): the rectangle spanned by the crop's relative positions (query_pos
  of pqcl.PQCLAugmentation, i.e. pqcl.relative_positions, flips folded in), from the
  smallest top-left corner to the largest plus one query-patch extent. It is computed
  from positions only, so a mishandled flip would show as a mirrored rectangle.
- attention: the student's last block, one query token over the global view's patches,
  mean over heads, read from the qkv projection of a normal forward_student call (a
  forward hook; nothing is re-implemented). The [CLS] key and the crop's own query keys
  are left out of the map; their shares of the attention are printed above it. The
  marked query patch is outlined in green where its position puts it.
- prototypes: argmax over the K prototypes of the teacher head on the query crop's patch
  tokens (centered, as the targets of Eq. 8 are) and of the student head on its query
  tokens from each view; same colour = same prototype, disagreements outlined red. The
  agreement rate is printed in the picture and on stdout.

Without --checkpoint the model is the random initialisation of the embedded preset that
training starts from (data.EMBEDDED, seeded by its Config.seed); without --image the
pictures show images of the embedded dataset's held-out split (its native 32 px).
--seed fixes the random views. Only the first query crop is drawn.
"""
import argparse
import colorsys
import functools
import os
import sys

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import draw_bounding_boxes, make_grid, save_image

import checkpoints
import data
import pqcl
from data import UsageError

FOOTPRINT = (0, 230, 255)  # cyan: the query crop's footprint in a global view
MARK = (60, 255, 60)  # green: the query patch whose attention a panel shows
MISMATCH = (230, 0, 0)  # red: a student prototype that differs from the teacher's
SOURCE_BOXES = {"A": (255, 150, 0), "B": (255, 60, 200), "Q": FOOTPRINT}
MARGIN_GREY, TEXT, PAPER = (110, 110, 110), (0, 0, 0), (255, 255, 255)
INFERNO = ((0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164))  # heat map anchors
VIEW_SIDE = 192  # target display side of a global view; small views are upscaled by a whole factor
FONT_SIZE, LINE = 14, 18  # title text (px) and line height
TITLE_HEIGHT = 2 * LINE + 4  # two lines above every panel
FOOTER_HEIGHT = 3 * LINE + 8  # three lines under the grid
PAD = 4  # make_grid's padding between cells
FOOTPRINT_WIDTH = 3  # px of the footprint's outline in a view panel, drawn inside the footprint


class Layout:
    """Sizes in display pixels. Each cell is a two-line title over a square panel; a panel
    shows a global view (S x S upscaled `scale` times) inside a grey margin of S/4 on each
    side, so footprints of query crops reaching beyond the view stay visible. Cells form
    2 rows (views A, B) of num_marked + 4 columns, padded by make_grid; a footer follows."""

    def __init__(self, img_size, num_marked):
        self.scale = max(1, round(VIEW_SIDE / img_size))
        self.view = img_size * self.scale
        self.margin = img_size // 4 * self.scale
        self.panel = self.view + 2 * self.margin
        self.columns, self.rows = num_marked + 4, 2
        self.width = self.columns * (self.panel + PAD) + PAD
        self.height = self.rows * (TITLE_HEIGHT + self.panel + PAD) + PAD + FOOTER_HEIGHT

    def to_panel(self, box):
        """(x0, y0, x1, y1) in view pixels (float) -> the inclusive integer pixel box
        covering [x0, x1) x [y0, y1) in the panel, as draw_bounding_boxes takes it."""
        x0, y0, x1, y1 = (round(v * self.scale) + self.margin for v in box)
        return x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)


# --------------------------------------------------------------------------------------
# Geometry and model outputs
# --------------------------------------------------------------------------------------


def marked_patches(query_grid):
    """The query patches whose attention is drawn: the crop's corners, (a, b) row-major."""
    last = query_grid - 1
    return list(dict.fromkeys([(0, 0), (0, last), (last, 0), (last, last)]))


def patch_extent(global_box, query_box, grid, query_grid):
    """(rows, cols): one query patch measured in global patches (the step of relative_positions)."""
    return (query_box[2] * grid / (query_grid * global_box[2]),
            query_box[3] * grid / (query_grid * global_box[3]))


def position_box(positions, extent, patch_size):
    """Top-left corners (row, col) of query patches, (n, 2) in global patches, each patch
    `extent` (rows, cols) in size -> the rectangle (x0, y0, x1, y1) they cover, in view
    pixels: from the smallest corner to the largest corner plus one extent."""
    low = positions.double().min(0).values  # (2,)
    high = positions.double().max(0).values + torch.tensor(extent, dtype=torch.float64)  # (2,)
    (y0, x0), (y1, x1) = (low * patch_size).tolist(), (high * patch_size).tolist()
    return x0, y0, x1, y1


def query_attention(qkv, num_raw, num_crops, num_heads):
    """Attention weights of the query tokens, from a block's qkv projection output
    (B, R + Q*L, 3D), as pqcl.Attention computes them: each crop's query tokens against
    the raw tokens and their own crop -> (B, Q, H, L, R + L), keys [CLS], patches, own crop."""
    B, T, _ = qkv.shape
    q, k, _ = qkv.view(B, T, 3, num_heads, -1).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, hd)
    L = (T - num_raw) // num_crops
    crop_q = q[:, :, num_raw:].unflatten(2, (num_crops, L)).transpose(1, 2)  # (B, Q, H, L, hd)
    own_k = k[:, :, num_raw:].unflatten(2, (num_crops, L)).transpose(1, 2)  # (B, Q, H, L, hd)
    raw_k = k[:, None, :, :num_raw].expand(-1, num_crops, -1, -1, -1)  # (B, Q, H, R, hd)
    keys = torch.cat([raw_k, own_k], dim=3)  # (B, Q, H, R + L, hd)
    return (crop_q @ keys.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)  # (B, Q, H, L, R + L)


@torch.no_grad()
def look(model, sample):
    """One augmented sample (PQCLAugmentation's dict) through the model in eval mode ->
    attention (V, Q, H, L, R + L) of the student's last block, prototype ids of the
    teacher (Q, L) and of the student from each view (V, Q, L)."""
    student = model.student.backbone
    last = student.blocks[-1].attn
    captured = []
    hook = last.qkv.register_forward_hook(lambda module, inputs, output: captured.append(output))
    try:  # the global views are the batch: (V, 3, S, S), query_pos (V, Q, L, 2) -> (V, R, D), (V, Q, L, D)
        tokens, query_tokens = student.forward_student(sample["globals"], sample["query_pos"])
    finally:
        hook.remove()
    attention = query_attention(captured[0], tokens.shape[1], query_tokens.shape[1], last.num_heads)
    student_logits = pqcl.apply_heads(model.student.heads, {"query": query_tokens})["query"]  # (V, Q, L, K)
    crop_tokens = model.teacher.backbone(sample["queries"])[:, 1:]  # (Q, L, D), own [CLS] dropped
    teacher_logits = pqcl.apply_heads(model.teacher.heads, {"query": crop_tokens})["query"]  # (Q, L, K)
    teacher_ids = (teacher_logits.float() - model.center_query).argmax(-1)  # the mode of teacher_probs
    return attention, teacher_ids, student_logits.argmax(-1)


# --------------------------------------------------------------------------------------
# Panels: uint8 tensors (3, panel, panel)
# --------------------------------------------------------------------------------------


@functools.lru_cache
def font(size=FONT_SIZE):
    return ImageFont.load_default(size=size)


def to_uint8(normalized):
    """Normalised view (3, h, w) -> displayable uint8 (3, h, w)."""
    mean = torch.tensor(pqcl.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(pqcl.IMAGENET_STD).view(3, 1, 1)
    return ((normalized * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)


def upscale(image, factor):
    """Nearest-neighbour upscaling by a whole factor: every source pixel stays a crisp square."""
    return image.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def blank(layout):
    return torch.tensor(MARGIN_GREY, dtype=torch.uint8).view(3, 1, 1).repeat(1, layout.panel, layout.panel)


def paste_centred(panel, image):
    h, w = image.shape[-2:]
    top, left = (panel.shape[1] - h) // 2, (panel.shape[2] - w) // 2
    panel[:, top:top + h, left:left + w] = image
    return panel


def draw_box(panel, box, colour, width):
    """Outline an inclusive pixel box (x0, y0, x1, y1) of the panel; parts beyond it are cut off."""
    return draw_bounding_boxes(panel, torch.tensor([box]), colors=[colour], width=width)


def write(panel, texts):
    """Draw [(x, y, text, colour)] onto a uint8 panel, outlined in black for any background."""
    picture = TF.to_pil_image(panel)
    draw = ImageDraw.Draw(picture)
    for x, y, text, colour in texts:
        draw.text((x, y), text, fill=colour, font=font(), stroke_width=2, stroke_fill=TEXT)
    return TF.pil_to_tensor(picture)


def view_panel(view, layout, footprint=None):
    """A global view (3, S, S) uint8 in its grey margin, with the footprint (view px) in cyan."""
    panel = paste_centred(blank(layout), upscale(view, layout.scale))
    return panel if footprint is None else draw_box(panel, layout.to_panel(footprint), FOOTPRINT, FOOTPRINT_WIDTH)


def heat_colours(values):
    """values (h, w) in [0, 1] -> uint8 (3, h, w), piecewise linear through INFERNO."""
    anchors = torch.tensor(INFERNO, dtype=torch.float32)  # (5, 3)
    position = values.clamp(0, 1) * (len(INFERNO) - 1)
    low = position.floor().long().clamp(max=len(INFERNO) - 2)
    frac = (position - low)[..., None]
    return (anchors[low] * (1 - frac) + anchors[low + 1] * frac).permute(2, 0, 1).round().to(torch.uint8)


def attention_panel(view, weights, footprint, patch_box, layout):
    """The view under its attention map weights (G, G) (scaled to its maximum, nearest
    upsampling), the crop's footprint (thin cyan) and the marked query patch (green)."""
    heat = heat_colours(weights / weights.max()).float()  # (3, G, G)
    heat = F.interpolate(heat[None], size=(layout.view, layout.view), mode="nearest")[0]  # (3, S*scale, S*scale)
    blended = (0.45 * upscale(view, layout.scale).float() + 0.55 * heat).round().to(torch.uint8)
    panel = paste_centred(blank(layout), blended)
    panel = draw_box(panel, layout.to_panel(footprint), FOOTPRINT, 1)
    return draw_box(panel, layout.to_panel(patch_box), MARK, 3)


def crop_panel(crop, patch_size, marked, layout):
    """The query crop (3, s, s) uint8 upscaled to about the view's side, its patch grid in
    dark grey and the marked patches outlined in green and numbered 1..k."""
    factor = max(1, layout.view // crop.shape[-1])
    side = patch_size * factor
    big = upscale(crop, factor)
    query_grid = crop.shape[-1] // patch_size
    cells = [(b * side, a * side, (b + 1) * side - 1, (a + 1) * side - 1)
             for a in range(query_grid) for b in range(query_grid)]
    big = draw_bounding_boxes(big, torch.tensor(cells), colors=[(40, 40, 40)] * len(cells), width=1)
    for a, b in marked:
        big = draw_box(big, cells[a * query_grid + b], MARK, 3)
    big = write(big, [(cells[a * query_grid + b][0] + 5, cells[a * query_grid + b][1] + 3, str(n), MARK)
                      for n, (a, b) in enumerate(marked, 1)])
    return paste_centred(blank(layout), big)


def source_panel(image, boxes, layout):
    """The source image (3, H, W) uint8 fitted into the view's square, with the boxes
    {name: (top, left, h, w) in source px} of the global views and the query crop."""
    height, width = image.shape[-2:]
    factor = layout.view / max(height, width)
    size = [max(1, round(height * factor)), max(1, round(width * factor))]
    mode = TF.InterpolationMode.NEAREST if factor >= 1 else TF.InterpolationMode.BILINEAR
    fitted = TF.resize(image, size, interpolation=mode, antialias=True)
    top, left = (layout.panel - size[0]) // 2, (layout.panel - size[1]) // 2
    panel = paste_centred(blank(layout), fitted)
    drawn = torch.tensor([[left + l * factor, top + t * factor, left + (l + w) * factor - 1, top + (t + h) * factor - 1]
                          for t, l, h, w in boxes.values()]).round().long()
    panel = draw_bounding_boxes(panel, drawn, colors=[SOURCE_BOXES[name] for name in boxes], width=2)
    corners = [(x1 - 14, y1 - LINE) if name == "B" else (x0 + 4, y0 + 2)  # labels apart: B bottom right
               for name, (x0, y0, x1, y1) in zip(boxes, drawn.tolist())]
    return write(panel, [(x, y, name, SOURCE_BOXES[name]) for name, (x, y) in zip(boxes, corners)])


def prototype_panel(ids, layout, reference=None):
    """Prototype ids (l, l) as coloured, numbered cells; same colour = same prototype.
    Cells that differ from `reference` (l, l) are outlined in red."""
    query_grid = ids.shape[0]
    picture = Image.new("RGB", (layout.view, layout.view), MARGIN_GREY)
    draw = ImageDraw.Draw(picture)
    edges = [round(i * layout.view / query_grid) for i in range(query_grid + 1)]
    label_font = font(max(8, min(FONT_SIZE, (edges[1] - edges[0]) // 3)))
    for a in range(query_grid):
        for b in range(query_grid):
            proto = int(ids[a, b])
            hue = (proto * 0.6180339887) % 1.0  # golden-ratio hues: neighbouring ids look different
            colour = tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.55, 0.95))
            box = (edges[b], edges[a], edges[b + 1] - 1, edges[a + 1] - 1)
            differs = reference is not None and proto != int(reference[a, b])
            draw.rectangle(box, fill=colour, outline=MISMATCH if differs else (40, 40, 40), width=4 if differs else 1)
            centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
            draw.text(centre, str(proto), fill=TEXT, font=label_font, anchor="mm")
    return paste_centred(blank(layout), TF.pil_to_tensor(picture))


def titled(panel, lines, layout):
    """A cell: two lines of title on white above the panel."""
    strip = Image.new("RGB", (layout.panel, TITLE_HEIGHT), PAPER)
    draw = ImageDraw.Draw(strip)
    for i, line in enumerate(lines):
        draw.text((3, 2 + i * LINE), line, fill=TEXT, font=font())
    return torch.cat([TF.pil_to_tensor(strip), panel], dim=1)


def footer(lines, width):
    strip = Image.new("RGB", (width, FOOTER_HEIGHT), PAPER)
    draw = ImageDraw.Draw(strip)
    for i, line in enumerate(lines):
        draw.text((PAD + 2, 4 + i * LINE), line, fill=TEXT, font=font())
    return TF.pil_to_tensor(strip)


# --------------------------------------------------------------------------------------
# The picture
# --------------------------------------------------------------------------------------


def render(model, image, seed=0, description="", image_name=""):
    """One image (PIL or uint8 tensor (3, H, W)) -> (picture uint8 (3, H, W) of Layout's
    size, agreement {"A", "B", "mean"}: fraction of the query patches whose student
    prototype from that view equals the teacher's). The views come from
    data.augmentation(model.cfg), seeded with `seed`."""
    cfg = model.cfg
    augment = data.augmentation(cfg)
    if augment.num_queries == 0:
        raise UsageError("this model was trained without query crops (query_weight 0): "
                         "it has no query tokens to picture")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sample = augment(image)
    attention, teacher_ids, student_ids = look(model, sample)  # (V, Q, H, L, R + L), (Q, L), (V, Q, L)
    grid, query_grid, P = cfg.img_size // cfg.patch_size, cfg.query_size // cfg.patch_size, cfg.patch_size
    L, num_raw = query_grid ** 2, 1 + grid ** 2
    marked = marked_patches(query_grid)
    layout = Layout(cfg.img_size, len(marked))
    query_box = sample["query_boxes"][0].tolist()
    source = image if isinstance(image, torch.Tensor) else TF.pil_to_tensor(image)
    agreement, cells = {}, []  # cells row-major: view A's row, then view B's
    for v, name in enumerate("AB"):
        global_box, flipped = sample["global_boxes"][v].tolist(), bool(sample["global_flips"][v])
        view = to_uint8(sample["globals"][v])
        positions = sample["query_pos"][v, 0]  # (L, 2), row-major over the query crop
        extent = patch_extent(global_box, query_box, grid, query_grid)
        footprint = position_box(positions, extent, P)
        if v == 0:
            shape = f"{cfg.query_size} px, {query_grid}x{query_grid} patches"
            shape += ", flipped" if sample["query_flips"][0] else ""
            first = titled(crop_panel(to_uint8(sample["queries"][0]), P, marked, layout),
                           ["query crop (teacher input)", shape], layout)
        else:
            boxes = {"A": sample["global_boxes"][0].tolist(), "B": global_box, "Q": query_box}
            first = titled(source_panel(source, boxes, layout),
                           ["source image, crop boxes", "A, B: views; Q: query crop"], layout)
        x0, y0, x1, y1 = footprint
        row = [first, titled(view_panel(view, layout, footprint),
                               [f"view {name}{' (flipped)' if flipped else ''} + query footprint",
                                f"footprint rows {y0 / P:.1f}-{y1 / P:.1f}, cols {x0 / P:.1f}-{x1 / P:.1f}"], layout)]
        weights = attention[v, 0].mean(0)  # (L, R + L), mean over heads
        for n, (a, b) in enumerate(marked, 1):
            token = weights[a * query_grid + b]  # (R + L,): [CLS], N patches, the crop's own L
            patch_box = position_box(positions[a * query_grid + b][None], extent, P)
            row.append(titled(attention_panel(view, token[1:num_raw].view(grid, grid), footprint, patch_box, layout),
                                [f"view {name}: attention of query patch {n}",
                                 f"max {token[1:num_raw].max():.3f} (1/N {1 / grid ** 2:.3f}), CLS {token[0]:.2f}, "
                                 f"own {token[num_raw:].sum():.2f}"],
                                layout))
        teacher, student = teacher_ids[0].view(query_grid, query_grid), student_ids[v, 0].view(query_grid, query_grid)
        agree = (teacher == student).sum().item()
        agreement[name] = agree / L
        row.append(titled(prototype_panel(teacher, layout),
                            ["teacher prototypes", "argmax over the query crop"], layout))
        row.append(titled(prototype_panel(student, layout, teacher),
                            [f"student prototypes, view {name}", f"agree {agree}/{L} = {agree / L:.0%}"], layout))
        cells.extend(row)
    agreement["mean"] = (agreement["A"] + agreement["B"]) / 2
    grid_picture = make_grid(cells, nrow=layout.columns, padding=PAD, pad_value=255)
    notes = [
        f"{image_name}  |  {description}  |  views seed {seed}"
        + (f"  |  query crop 1 of {augment.num_queries}" if augment.num_queries > 1 else ""),
        "Cyan: the query crop's footprint from its relative positions (flips included). Heat: the student's "
        "last-block attention of one query token over the view's patches, mean over heads; [CLS] and own-crop keys "
        "left out (shares above).",
        f"Prototypes: argmax of the teacher head on the crop's patch tokens (centered) vs. of the student head on its "
        f"query tokens. Agreement: view A {agreement['A']:.0%}, view B {agreement['B']:.0%}, "
        f"mean {agreement['mean']:.0%}.",
    ]
    return torch.cat([grid_picture, footer(notes, grid_picture.shape[-1])], dim=1), agreement


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def load_model(checkpoint_path=None):
    """-> (PQCL in eval mode, one-line description). No path: the embedded preset's random
    initialisation, the one training starts from."""
    if checkpoint_path is None:
        cfg = data.preset_config("embedded")
        torch.manual_seed(cfg.seed)
        return pqcl.PQCL(cfg).eval(), f"random init, embedded preset ({cfg.arch}, {cfg.depth} blocks)"
    if not os.path.isfile(checkpoint_path):
        raise UsageError(f"--checkpoint {checkpoint_path}: no such file; pass the checkpoint.pth that "
                         "train_ddp.py wrote, or omit --checkpoint for a random init")
    model, checkpoint = checkpoints.model_from_checkpoint(checkpoint_path)
    cfg = model.cfg
    return model.eval(), (f"{checkpoint_path}, step {checkpoint.get('step', '?')} ({cfg.arch}, "
                          f"{len(model.student.backbone.blocks)} blocks)")


def load_images(paths, indices, seed):
    """-> [(name, image)]: files as PIL RGB images (as training reads them), else the given
    images of the embedded dataset's held-out split (data.embedded_splits' test part)."""
    if paths:
        images = []
        for path in paths:
            try:
                with Image.open(path) as image:
                    images.append((os.path.splitext(os.path.basename(path))[0], image.convert("RGB")))
            except OSError as error:
                raise UsageError(f"--image {path}: not a readable image ({error})") from None
        return images
    if not all(0 <= i < data.EMBEDDED_TEST for i in indices):
        raise UsageError(f"--index: the held-out split has images 0 to {data.EMBEDDED_TEST - 1}")
    held_out = data.embedded_test_split(seed, 32)
    shape_names = list(data.SHAPES)
    return [(f"embedded-test-{i}-{shape_names[held_out[1][i]]}", held_out[0][i]) for i in indices]


def build_parser():
    parser = data.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a checkpoint.pth of train_ddp.py (default: a random init of the "
                                             "embedded preset)")
    parser.add_argument("--image", nargs="+", metavar="PATH", help="image files, one picture each (default: "
                                                                   "images of the embedded held-out split)")
    parser.add_argument("--index", nargs="+", type=int, default=[0],
                        help="without --image: which held-out embedded images (0-999)")
    parser.add_argument("--out", default="runs/pictures", help="folder for the PNGs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random views (crops, flips, colours)")
    return parser


def main(argv=None):
    try:
        args = build_parser().parse_args(argv)
        model, description = load_model(args.checkpoint)
        images = load_images(args.image, args.index, model.cfg.seed)
        os.makedirs(args.out, exist_ok=True)
        for name, image in images:
            picture, agreement = render(model, image, args.seed, description, name)
            path = os.path.join(args.out, f"{name}.png")
            save_image(picture.float() / 255, path)
            print(f"wrote {path}: student/teacher prototype agreement view A {agreement['A']:.0%}, "
                  f"view B {agreement['B']:.0%}, mean {agreement['mean']:.0%}")
        return 0
    except UsageError as error:
        print(f"visualize.py: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
