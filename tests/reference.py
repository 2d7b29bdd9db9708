"""Slow, obviously-correct whole-volume references the streamed stages must equal exactly."""

from __future__ import annotations

import itertools
import math

import numpy as np
import scipy.ndimage as ndi


def reference_corrected(raw, *, window, mode="exact", stride=1, dark=None, scales=None, filter_size=3, gain=None,
                        mask=None):
    """Corrected frames of a whole scan: np.median over each frame's window, ``mask``'s pixels set to 0, then
    scipy's median filter.

    Each frame is first brought to the beam intensity: q_j = (raw_j - dark) * scales[j] + dark, rounded and
    clipped to the raw type for integer frames; normalised frame j is (q_j - dark) * gain (gain = 1 / flat).
    A scale of 0 marks an unusable frame, see background.stage (BackgroundStage._normalise and _bridge)."""
    n = raw.shape[0]
    if n < window:
        window = n if n % 2 else n - 1
    h = window // 2
    dark = np.zeros(raw.shape[1:], np.float32) if dark is None else dark.astype(np.float32)
    scales = np.ones(n, np.float32) if scales is None else np.asarray(scales, np.float32)
    gain = np.ones(raw.shape[1:], np.float32) if gain is None else gain.astype(np.float32)
    q = (raw.astype(np.float32) - dark) * scales[:, None, None] + dark
    if raw.dtype.kind in "ui":
        info = np.iinfo(raw.dtype)
        q = np.clip(np.rint(q).astype(np.float64), info.min, info.max).astype(raw.dtype)
    q = np.where((scales == 1)[:, None, None], raw, q)  # an unscaled frame is kept as it is
    if raw.dtype.kind in "ui":  # an unusable frame: alternately the bottom and the top of the type, in no median
        info = np.iinfo(raw.dtype)
        for k in np.flatnonzero(scales == 0):
            q[k] = info.max if k % 2 else info.min
    normalised = (q.astype(np.float32) - dark) * gain
    out = np.empty(raw.shape, np.float32)
    for k in range(n):
        centre = (k // stride) * stride + stride // 2 if mode == "block" else k
        start = min(max(centre - h, 0), n - window)
        background = np.median(normalised[start:start + window], axis=0)
        corrected = normalised[k] - background
        if scales[k] == 0:  # unusable: the mean of the frames beside it where both are usable, else 0
            usable = 0 < k < n - 1 and scales[k - 1] != 0 and scales[k + 1] != 0
            corrected = ((normalised[k - 1] - background) + (normalised[k + 1] - background)) * np.float32(0.5) \
                if usable else np.zeros_like(corrected)
        if mask is not None:
            corrected = np.where(mask, np.float32(0), corrected)
        out[k] = ndi.median_filter(corrected, size=filter_size, mode="reflect") if filter_size > 1 else corrected
    return out


SPLIT_LOW = 2.0  # as dctstream.segment.segmenter.SPLIT_LOW: a second maximum stands out by 2 x grow_low
# as dctstream.segment.segmenter's: sharing touching spots' voxels (SPOT_SHARES)
SHARE_ROUNDS, SHARE_SETTLED_PX, SHARE_SPREAD_PX2, SHARE_SHAPE, SHARE_TOL_PX = 30, 1e-5, 0.25, 0.7, 1e-3
SHARE_SHAPED_ROUNDS, SHARE_ROUND_BUDGET = 300, 30 * 2_000_000


def reference_blobs(volume, params, mask=None, seed_tiles=None, low_tiles=None, flood_limit=None, spots=None,
                    others=None, spikes=None, touching=None):
    """Whole-volume double threshold: scipy.ndimage.label on the seeds, then greedy growth brightest first.

    ``seed_tiles`` / ``low_tiles``: each frame's own (tiles_y, tiles_x) threshold maps, one per frame.
    ``flood_limit``: a frame with more 2-D seed regions than that has its two thresholds doubled until
    it has not (at most 4 times). Returns (blobs, rejected) where blobs is a list of (frame, y, x) voxel
    arrays in growth order and rejected counts the rejections by reason. ``spots``: a list that gets each
    blob's part of its component at the lower clamp (where its centroid is taken), as (frame, y, x) voxels and
    their weights (its values; the blobs of one component: their shares of all their parts, `reference_shares`);
    ``others``: a list that gets the rest of that component (the touching spots' parts), the same way;
    ``touching``: a list that gets, for a blob of a component split into several, the voxels of their parts, which
    part holds each and the blob's part's number (else None).
    ``spikes``: a boolean volume of the voxels whose unfiltered value was a zinger's (see `is_zinger`).
    A part whose blob is rejected as too small or as a zinger, one frame deep and 10 x its lower clamp high,
    takes out only its voxels and those of its frame within 2 px of its box: the component's voxels no part has
    taken are split again, each part with seed_min_voxels seeds (2 x the lower clamp) a spot's.
    """
    nf, ny, nx = volume.shape
    mask = np.zeros((ny, nx), bool) if mask is None else mask
    allowed = np.broadcast_to(~mask, volume.shape)
    structure = ndi.generate_binary_structure(3, 1 if params.connectivity == 6 else 3)

    def pixels(tiles):
        t = params.tile_px
        return np.repeat(np.repeat(np.asarray(tiles, np.float64), t, 0), t, 1)[:ny, :nx]

    static_seed, static_low = params.maps((ny, nx))
    seed_map = np.stack([static_seed if seed_tiles is None else pixels(seed_tiles[k]) for k in range(nf)])
    low_map = np.stack([static_low if low_tiles is None else pixels(low_tiles[k]) for k in range(nf)])
    if flood_limit is not None:
        plane = ndi.generate_binary_structure(2, 1 if params.connectivity == 6 else 2)
        for k in range(nf):
            factor = 1.0
            while ndi.label((volume[k] >= factor * seed_map[k]) & ~mask, structure=plane)[1] > flood_limit \
                    and factor < 16:
                factor *= 2
            seed_map[k] *= factor
            low_map[k] *= factor
    # the segmenter compares float32 values with float32 thresholds rounded up: the same voxels
    labels, n = ndi.label((volume >= seed_map) & allowed, structure=structure)
    rejected = {"seed_min_voxels": 0, "maximum_claimed": 0, "tail_of_blob": 0, "too_small": 0, "too_large": 0,
                "zinger": 0}
    regions = []
    for i, box in enumerate(ndi.find_objects(labels), start=1):
        members = np.argwhere(labels[box] == i) + [s.start for s in box]  # (frame, y, x), C order
        if len(members) < params.seed_min_voxels:
            rejected["seed_min_voxels"] += 1
            continue
        values = volume[tuple(members.T)]
        peak = members[np.flatnonzero(values == values.max())[0]]
        regions.append((-float(values.max()), *map(int, peak)))
    regions.sort()
    claimed = np.zeros(volume.shape, bool)
    reach_x, reach_y, reach_f = params.max_size
    blobs = []
    for neg_peak, f, y, x in regions:
        # the component within 2 x max_blob_size of the maximum in x and y: each spot is cut by its own box
        box = (slice(max(f - reach_f, 0), f + reach_f + 1), slice(max(y - 2 * reach_y, 0), y + 2 * reach_y + 1),
               slice(max(x - 2 * reach_x, 0), x + 2 * reach_x + 1))
        peak = -neg_peak
        high = np.inf if params.grow_high is None else params.grow_high
        # the component at the lower clamp, split into its spots, each the double threshold of its own peak
        threshold = np.minimum(np.minimum(low_map[box], high), peak)
        eligible = (volume[box] >= threshold) & ~claimed[box] & allowed[box]
        local = (f - box[0].start, y - box[1].start, x - box[2].start)
        if not eligible[local]:
            rejected["maximum_claimed"] += 1
            continue
        component, _ = ndi.label(eligible, structure=structure)
        grown = np.argwhere(component == component[local]) + [s.start for s in box]
        values = volume[tuple(grown.T)].astype(np.float64)
        stand_out = SPLIT_LOW * low_map[tuple(grown.T)]

        def take(root, in_part, part_peak):
            """The blob of the part ``in_part`` (over grown) around ``root`` (kept, or rejected); its voxels where
            it is rejected as a zinger (claimed once the component is split) or is a zinger's remnant (rejected
            as too small or as a zinger, one frame deep, 10 x its lower clamp high), else None; and whether it is
            such a remnant."""
            # the part beside claimed voxels (in the box) brighter than its peak, not standing out above the
            # brightest of its voxels there by the split rule: a blob's tail
            brighter = np.zeros(volume.shape, bool)
            brighter[box] = claimed[box] & (volume[box] > part_peak)
            beside = ndi.binary_dilation(brighter, structure=structure)[tuple(grown[in_part].T)]
            if beside.any():
                saddle = values[in_part][beside].max()
                ratio, photon = params.split_rule()
                if part_peak - saddle < max(math.sqrt(stand_out[root] ** 2 + photon * max(saddle, 0.0)),
                                            ratio * part_peak):
                    rejected["tail_of_blob"] += 1
                    return None, False
            part_threshold = np.minimum(np.minimum(np.maximum(params.grow_ratio * part_peak,
                                                              low_map[tuple(grown.T)]), high), part_peak)
            part = np.zeros(volume.shape, bool)
            inside = in_part & (values >= part_threshold)
            part[tuple(grown[inside].T)] = True
            labels_part, _ = ndi.label(part, structure=structure)
            voxels = np.argwhere(labels_part == labels_part[tuple(grown[root])])
            extent = voxels.max(axis=0) - voxels.min(axis=0) + 1  # (frames, y, x)
            size = (extent[2], extent[1], extent[0])
            bright = part_peak >= 10.0 * low_map[tuple(grown[root])]
            if any(s < m for s, m in zip(size, params.min_size)):
                rejected["too_small"] += 1
                remnant = bright and extent[0] == 1
                return (voxels if remnant else None), remnant
            # cut: it reaches an edge, inside the volume, of its own peak's box or of the component's
            boxes = ((grown[root], (reach_f, reach_y, reach_x)), ((f, y, x), (reach_f, 2 * reach_y, 2 * reach_x)))
            if any((voxels.min(axis=0) <= np.subtract(centre, reach)).any()
                   or (voxels.max(axis=0) >= np.add(centre, reach)).any() for centre, reach in boxes):
                rejected["too_large"] += 1
                return None, False
            if params.drop_zingers and is_zinger(volume, low_map, voxels, grown[root], spikes=spikes):
                rejected["zinger"] += 1
                return voxels, bright
            claimed[tuple(voxels.T)] = True
            blobs.append(voxels)
            taken.append((voxels, in_part))
            if spots is not None:  # the part, unless its centroid lies beyond the blob's box by the box's extent
                own_part = grown[in_part]
                w = volume[tuple(own_part.T)].astype(np.float64)
                near = near_box(w, own_part, voxels)
                spots.append((own_part, w) if near else (voxels, volume[tuple(voxels.T)].astype(np.float64)))
            if others is not None:
                others.append(grown[~in_part])
            if touching is not None:
                touching.append(None)
            return None, False

        # the component's voxels no part has taken: split, and split again without a zinger's remnant and the
        # voxels of its frame within 2 px of its box (what the filter made of it), whose parts with
        # seed_min_voxels seeds (2 x the lower clamp) are spots' parts
        alive = np.ones(len(grown), bool)
        taken = []  # each blob of this component: its voxels and which of grown are its part
        zingers = []  # the voxels of the blobs dropped as zingers or remnants, claimed once the component is split
        first = True
        while alive.any():
            at = np.flatnonzero(alive)
            top = at[np.array(reference_split(grown[at], values[at], stand_out[at], *params.split_rule(),
                                              params.connectivity == 26))]
            own, touches = -1, False
            if first:
                # the region's own maximum in a brighter voxel's part: the skirt of a spot grown before, not a
                # spot ... when that part touches a claimed voxel in the frames of its growth box (a peak where
                # the seed threshold is higher is no seed)
                own = top[next(i for i, v in enumerate(grown) if tuple(v) == (f, y, x))]
                part_mask = np.zeros(volume.shape, bool)
                part_mask[tuple(grown[top == own].T)] = True
                touches = (ndi.binary_dilation(part_mask, structure=structure) & claimed)[box[0]].any()
            again = False
            for root in sorted(set(top.tolist()), key=lambda r: (-values[r], r)):
                in_part = np.zeros(len(grown), bool)
                in_part[at[top == root]] = True
                if root == own and values[own] > peak and touches:
                    rejected["tail_of_blob"] += 1
                elif first or np.count_nonzero(values[in_part] >= stand_out[in_part]) >= params.seed_min_voxels:
                    dropped, remnant = take(root, in_part, values[root])
                    if dropped is not None:
                        zingers.append(dropped)
                    if remnant:
                        for k in set(dropped[:, 0].tolist()):  # each of its frames' box grown by 2 px
                            (_, ya, xa), (_, yb, xb) = dropped[dropped[:, 0] == k].min(axis=0), \
                                dropped[dropped[:, 0] == k].max(axis=0)
                            alive &= ~((grown[:, 0] == k) & (np.abs(grown[:, 1] - (ya + yb) / 2) <= (yb - ya) / 2 + 2)
                                       & (np.abs(grown[:, 2] - (xa + xb) / 2) <= (xb - xa) / 2 + 2))
                        again = True
                        break
                alive &= ~in_part
            if not again:
                break
            first = False
        for dropped in zingers:
            claimed[tuple(dropped.T)] = True
        if len(taken) > 1:  # touching spots: their shares of all their parts
            owner = np.full(len(grown), -1)
            for p, (_, in_part) in enumerate(taken):
                owner[in_part] = p
            held = grown[owner >= 0]
            if touching is not None:
                touching[len(touching) - len(taken):] = [(held, owner[owner >= 0], p) for p in range(len(taken))]
            if spots is not None:
                shares = reference_shares(held, volume[tuple(held.T)].astype(np.float64), owner[owner >= 0],
                                          len(taken))
                for p, (voxels, _) in enumerate(taken):
                    if near_box(shares[p], held, voxels):
                        spots[len(spots) - len(taken) + p] = (held, shares[p])
    return blobs, rejected


def near_box(weights, voxels, blob) -> bool:
    """Whether the centroid of ``weights`` at ``voxels`` lies within the box of the ``blob``'s voxels grown by its
    own extent (at least 2) along each axis, give or take 1e-9 (as the segmenter's NEAR_SLACK)."""
    total = weights.sum()
    if not total > 0:
        return False
    centre = (weights[:, None] * voxels).sum(axis=0) / total
    low, high = blob.min(axis=0), blob.max(axis=0)
    return bool(np.all(np.abs(centre - (low + high) / 2) <= (high - low) / 2 + np.maximum(high - low + 1, 2) + 1e-9))


def reference_shares(voxels, values, owner, n_parts, rounds=SHARE_ROUNDS, shaped_rounds=None, spread=SHARE_SPREAD_PX2,
                     shape=SHARE_SHAPE, tol=SHARE_TOL_PX, settled=SHARE_SETTLED_PX):
    """Each part's share of the ``values`` of (frame, y, x) ``voxels``: first its own (``owner``), then in
    proportion to each part's model -- its image over the voxels' pixels, normalised, times its share summed per
    frame; the image: ``rounds`` times (fewer once no part's centroid moved by ``settled`` in a round after the
    first) the Gaussian g of its share's weighted mean and covariance in y, x (+ ``spread`` on the diagonal),
    then up to ``shaped_rounds`` times (by default as many as the segmenter's budget allows) its share summed per
    pixel, s, as s^shape g^(1 - shape) (each normalised), until no part's centroid moved by ``tol`` or more in
    the last round."""
    if shaped_rounds is None:
        shaped_rounds = min(SHARE_SHAPED_ROUNDS, max(SHARE_ROUND_BUDGET // (n_parts * len(values)) - rounds, 0))
    f, y, x = voxels.T
    pixels, pixel = np.unique(voxels[:, 1:], axis=0, return_inverse=True)
    pixel = pixel.ravel()
    frame = f - f.min()
    share = np.zeros((n_parts, len(values)))
    share[owner, np.arange(len(values))] = values
    centres = np.full((n_parts, 2), np.nan)
    gaussian = rounds
    for r in range(rounds + shaped_rounds):
        if r >= gaussian + shaped_rounds:
            break
        model = np.zeros_like(share)
        moved = 0.0
        for p in range(n_parts):
            w = np.maximum(share[p], 0.0)
            if not w.sum() > 0:
                continue
            centre = np.array([np.average(y, weights=w), np.average(x, weights=w)])
            moved = max(moved, *np.abs(centre - centres[p]))
            centres[p] = centre
            d = np.stack([y, x], axis=1) - centre
            covariance = (w[:, None, None] * d[:, :, None] * d[:, None, :]).sum(axis=0) / w.sum() + spread * np.eye(2)
            e = pixels - centre
            image = np.exp(-0.5 * np.einsum("ni,ij,nj->n", e, np.linalg.inv(covariance), e))
            if r >= gaussian:
                light = np.bincount(pixel, w, len(pixels))
                image = (light / light.sum()) ** shape * (image / image.sum()) ** (1 - shape)
            model[p] = image[pixel] / image.sum() * np.bincount(frame, w)[frame]
        if r > gaussian and moved < tol:
            break
        if 0 < r < gaussian - 1 and moved < settled:
            gaussian = r + 1
        total = model.sum(axis=0)
        share = np.where(total > 0, values * (model / np.where(total > 0, total, 1.0)), share)
    return share


def is_zinger(volume, low_map, voxels, peak, most=12, track=48, elongation=6.0, spikes=None, beside=None):
    """A blob (its (frame, y, x) voxels, its maximum at ``peak``) one frame deep: in one frame, at most ``most``
    voxels, or ``track`` whose pixels' position variances along their principal axes (each pixel a unit
    square: + 1/12) are in a ratio of ``elongation`` or more; and a voxel of ``spikes`` (a zinger taken out of
    the unfiltered values) among its own, or its maximum 10 x its lower clamp or more with fewer than 2 of its
    pixels at or above the lower clamp and a tenth of that maximum in the frame before and in the frame after it
    (those in the volume)."""
    frames = sorted(set(voxels[:, 0].tolist()))
    if len(frames) == 2 and frames[1] == frames[0] + 1:  # two zingers in a row: no rocking curve joins them
        peaks = []
        for g in frames:
            own = voxels[voxels[:, 0] == g]
            peaks.append((g, own, own[np.argmax(volume[tuple(own.T)])]))
        return all(volume[h, at[1], at[2]] < max(low_map[h, at[1], at[2]], 0.1 * volume[tuple(at)])
                   and is_zinger(volume, low_map, own, at, most, track, elongation, spikes, beside=h)
                   for (g, own, at), h in zip(peaks, frames[::-1]))
    if len(frames) != 1 or len(voxels) > track:
        return False
    if len(voxels) > most:
        centred = voxels[:, 1:] - voxels[:, 1:].mean(axis=0)
        variances = np.linalg.eigvalsh(centred.T @ centred / len(voxels) + np.eye(2) / 12)
        if variances[1] / variances[0] < elongation:
            return False
    peak_lows = 10.0
    spiked = spikes is not None and spikes[tuple(voxels.T)].any()
    if spiked:
        return True
    if volume[tuple(peak)] < peak_lows * low_map[tuple(peak)]:
        return False
    k = frames.pop()
    top = volume[tuple(peak)]
    for g in (k - 1, k + 1):
        if 0 <= g < volume.shape[0] and g != beside:
            if sum(volume[g, y, x] >= max(low_map[g, y, x], 0.1 * top) for _, y, x in voxels) >= 2:
                return False
    return True


def reference_split(voxels, values, stand_out, ratio, photon, conn26):
    """Plainly: flood the voxels brightest first (ties in index order); a voxel with no flooded neighbour
    starts a part; where parts meet at a voxel of value s, each dimmer one whose peak p stands less than
    max(sqrt(stand_out at its peak ** 2 + photon * max(s, 0)), ratio * p) above s joins the brightest; the
    voxel joins its brightest neighbour's part. Returns each voxel's part, as the index of the part's peak."""
    index = {tuple(v): i for i, v in enumerate(np.asarray(voxels).tolist())}
    offsets = [d for d in itertools.product((-1, 0, 1), repeat=3)
               if any(d) and (conn26 or sum(map(abs, d)) == 1)]
    owner = {}

    def part(i):
        while owner[i] != i:
            i = owner[i]
        return i

    for i in sorted(range(len(values)), key=lambda i: (-values[i], i)):
        f, y, x = voxels[i]
        flooded = [index[n] for n in ((f + a, y + b, x + c) for a, b, c in offsets)
                   if n in index and index[n] in owner]
        if not flooded:
            owner[i] = i
            continue
        parts = sorted({part(j) for j in flooded}, key=lambda r: (-values[r], r))
        for r in parts[1:]:
            if values[r] - values[i] < max(math.sqrt(stand_out[r] ** 2 + photon * max(values[i], 0.0)),
                                           ratio * values[r]):
                owner[r] = parts[0]
        owner[i] = part(min(flooded, key=lambda j: (-values[j], j)))
    return [part(i) for i in range(len(values))]


def reference_sigma(values, clip=4.0, passes=3, covered=2.0, min_below=8, shifted=3.0):
    """The noise of some values: 1.4826 x MAD (or 1.2533 x mean absolute deviation), then the standard
    deviation of the values within ``clip`` of those sigmas of the median, ``passes`` times. If the median
    is above 0 and at least ``min_below`` values are below 0: the root mean square of those, then of the
    values within ``clip`` of it about 0, ``passes`` times; taken if ``covered`` times it is under the
    former (a spot covers most values). NaN if the median is more than ``shifted`` of the first sigmas below 0
    (a frame without its background: the beam off)."""
    centre = np.median(values)
    deviation = np.abs(values - centre)
    sigma = 1.4826 * np.median(deviation)
    if sigma <= 0:
        sigma = 1.2533 * deviation.mean()
    for _ in range(passes):
        if sigma <= 0:
            break
        kept = deviation[deviation < clip * sigma]
        sigma = np.sqrt(np.mean(kept ** 2)) if kept.size else 0.0
    if centre < -shifted * sigma:
        return np.nan
    below = values[values < 0]
    if centre > 0 and below.size >= min_below:
        about_zero = np.sqrt(np.mean(below ** 2))
        for _ in range(passes):
            if about_zero <= 0:
                break
            kept = values[np.abs(values) < clip * about_zero]
            about_zero = np.sqrt(np.mean(kept ** 2)) if kept.size else 0.0
        if about_zero > 0 and covered * about_zero < sigma:
            sigma = about_zero
    return sigma


def reference_frame_noise(frame, mask, tile=32, step=2):
    """Noise per tile of one frame over its unmasked pixels on a grid of ``step``; NaN where fewer than
    a quarter of the grid (at most 32) are unmasked."""
    min_samples = min(32, max((tile // step) ** 2 // 4, 1))
    ny, nx = frame.shape
    out = np.full((-(-ny // tile), -(-nx // tile)), np.nan)
    for ty in range(out.shape[0]):
        for tx in range(out.shape[1]):
            box = (slice(ty * tile, (ty + 1) * tile, step), slice(tx * tile, (tx + 1) * tile, step))
            values = frame[box][~mask[box]].astype(np.float64)
            if values.size >= min_samples:
                out[ty, tx] = reference_sigma(values)
    return out


def reference_frame_level(frame, measure, mask, sigma, tile=32, step=2, exclude=3.0, clip=10.0):
    """Mean per tile of ``measure`` over the unmasked pixels on a grid of ``step`` where ``frame`` is below
    ``exclude`` x the tile's ``sigma`` and ``measure`` within ``clip`` x ``sigma`` of 0; NaN where fewer
    than a quarter of the grid (at most 32) such pixels."""
    min_samples = min(32, max((tile // step) ** 2 // 4, 1))
    out = np.full(sigma.shape, np.nan)
    for ty in range(out.shape[0]):
        for tx in range(out.shape[1]):
            box = (slice(ty * tile, (ty + 1) * tile, step), slice(tx * tile, (tx + 1) * tile, step))
            s = sigma[ty, tx]
            m = measure[box].astype(np.float64)
            keep = ~mask[box] & (frame[box] < exclude * s) & (np.abs(m) <= clip * s)
            if keep.sum() >= min_samples:
                out[ty, tx] = m[keep].mean()
    return out


def reference_thresholds(volume, mask, seg, *, prime=5, history=15, floor=0.5, tile=32):
    """Each frame's seed and lower grow clamp tile maps for the ``auto`` segmentation settings ``seg``:
    seed_sigma x the median of the tile noise over the first ``prime`` frames (for those frames) or the
    last ``history`` frames (NaN tiles: the median of the others; at least ``floor``)."""
    per_frame = [reference_frame_noise(f, mask, tile) for f in volume]
    seeds, lows = [], []
    for k in range(len(volume)):
        held = per_frame[:prime] if k < prime else per_frame[max(0, k - history + 1):k + 1]
        sigma = np.nanmedian(np.stack(held), axis=0)
        sigma = np.where(np.isfinite(sigma), sigma, np.median(sigma[np.isfinite(sigma)]))
        sigma = np.maximum(sigma, floor)
        seed = seg.seed_sigma * sigma if seg.seed_threshold == "auto" else np.full(sigma.shape, seg.seed_threshold)
        low = 0.5 * seed if seg.grow_low == "auto" else np.full(sigma.shape, seg.grow_low)
        seeds.append(seed)
        lows.append(low)
    return np.stack(seeds), np.stack(lows)


def reference_direct_beam(image, margin_px, mask=None, level=0.1, plateau_level=0.25, min_plateau=0.75,
                          min_part=0.01, min_contrast=10.0, samples=1 << 18, thickness=7, part_levels=(0.25, 4.0)):
    """`direct_beam.detect_direct_beam` labelling the whole frame: the box (x0, y0, w, h) of the bright
    parts (above ``level`` of the way from the typical level to the brightest, opened by a ``thickness``
    square, each at least ``min_part`` of the largest and with a median above the typical level within
    ``part_levels`` of the largest's), grown by ``margin_px``; None without contrast or plateau."""
    from scipy import ndimage

    valid = (image if mask is None else image[~mask]).reshape(-1)
    if valid.size == 0:
        return None
    typical, brightest = (float(v) for v in np.percentile(valid[::-(-valid.size // samples)], [50, 99.9]))
    typical = max(typical, 0.0)
    if brightest <= typical or brightest < min_contrast * max(typical, 1.0):
        return None
    usable = np.ones(image.shape, bool) if mask is None else ~mask
    bright = usable & (image > typical + level * (brightest - typical))
    plateau = usable & (image > typical + plateau_level * (brightest - typical))
    if plateau.sum() < min_plateau * bright.sum():
        return None
    labels, n = ndimage.label(ndimage.binary_opening(bright, np.ones((thickness, thickness), bool)))
    if n == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    main = sizes.argmax()
    levels = np.array([np.median(image[labels == i + 1] - typical) for i in range(n)])
    keep = (sizes >= min_part * sizes[main]) & (levels >= part_levels[0] * levels[main]) \
        & (levels <= part_levels[1] * levels[main])
    ys, xs = np.nonzero(np.isin(labels, 1 + np.flatnonzero(keep)))
    ny, nx = image.shape
    x0, y0 = max(xs.min() - margin_px, 0), max(ys.min() - margin_px, 0)
    x1, y1 = min(xs.max() + margin_px, nx - 1), min(ys.max() + margin_px, ny - 1)
    return (int(x0), int(y0), int(x1 - x0 + 1), int(y1 - y0 + 1))
