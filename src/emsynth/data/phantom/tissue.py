"""The tissue of one phantom volume and how it is drawn, slice by slice.

Cells are a noise-warped Voronoi tessellation of drifting seeds; their boundaries, thickened and
rounded at the corners, make the membrane mask. Mitochondria are 3-D capsules owned by a cell and
clipped to its interior, so consecutive slices show them moving, appearing and vanishing. An
imaging model (blur, shot and read noise, brightness, contrast, uneven illumination) turns the
tissue into a uint8 image (`Tissue.render`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from emsynth.data.phantom.domains import PhantomDomain
from emsynth.data.phantom.noise import EvolvingField, gaussian_noise_field


@dataclass
class Geometry:
    cells: np.ndarray  # int32 cell id per pixel (seed index + 1)
    membrane: np.ndarray  # bool
    boundary_distance: np.ndarray  # float32, distance to the nearest cell boundary
    half_thickness: np.ndarray  # float32, local membrane half thickness
    membrane_distance: np.ndarray  # float32, distance to the nearest membrane pixel
    mito_ids: np.ndarray  # int32, 0 = none, else mitochondrion index + 1
    mito_depth: np.ndarray  # float32, distance inside a mitochondrion to its outline
    mito_centres: dict[int, tuple[float, float]]  # mitochondrion index -> (y, x) this slice


class Tissue:
    """The tissue of one phantom volume: drifting cell seeds and 3-D mitochondria."""

    def __init__(self, d: PhantomDomain, shape: tuple[int, int], seed: int, n_slices: int):
        self.d, self.shape, self.seed, self.n_slices = d, shape, seed, n_slices
        rng = np.random.default_rng([seed, 0])
        self.drift = d.cell_tilt * d.section_thickness_nm / d.pixel_size_nm  # px per slice
        warp_reach = 3.0 * (d.boundary_warp_px + d.boundary_wiggle_px)
        travel = min(3.0 * self.drift * max(n_slices - 1, 0), 4.0 * max(shape))
        self.pad = int(np.ceil(1.5 * d.cell_size_px + warp_reach + travel))
        self.frame = (shape[0] + 2 * self.pad, shape[1] + 2 * self.pad)

        rate = d.section_thickness_nm / d.z_correlation_nm
        self.warp_y = EvolvingField(rng, shape, d.boundary_warp_scale_px, rate, n_slices)
        self.warp_x = EvolvingField(rng, shape, d.boundary_warp_scale_px, rate, n_slices)
        wiggle = d.boundary_wiggle_scale_px
        self.wiggle_y = EvolvingField(rng, shape, wiggle, 2 * rate, n_slices)
        self.wiggle_x = EvolvingField(rng, shape, wiggle, 2 * rate, n_slices)
        self.thickness = EvolvingField(rng, shape, 2.0 * d.cell_size_px, rate, n_slices)

        self._place_seeds(rng)
        self._place_mitochondria(rng)

    # --- construction -------------------------------------------------------------------

    def _place_seeds(self, rng: np.random.Generator) -> None:
        """Seeds with density following a log-normal cell-size field, lightly relaxed."""
        d = self.d
        coarse = max(4, int(d.cell_size_px / 2))
        grid = (self.frame[0] // coarse + 1, self.frame[1] // coarse + 1)
        log_size = gaussian_noise_field(rng, grid, 2.5 * d.cell_size_px / coarse)
        size = d.cell_size_px * np.clip(
            np.exp(d.cell_size_spread * log_size - d.cell_size_spread**2), 0.4, 2.5
        )
        expected = size**-2.0
        expected *= self.frame[0] * self.frame[1] / d.cell_size_px**2 / expected.sum()
        n = max(1, rng.poisson(expected.sum()))
        flat = rng.choice(expected.size, size=n, p=(expected / expected.sum()).ravel())
        pts = (np.stack(np.unravel_index(flat, grid), 1) + rng.random((n, 2))) * coarse
        local = size.ravel()[flat]
        for _ in range(3):  # push apart neighbours closer than 0.55 x the local cell size
            dist, idx = cKDTree(pts).query(pts, k=2)
            gap = np.maximum(dist[:, 1], 1e-6)
            push = np.clip(0.55 * local - gap, 0, None)[:, None] / 2
            pts = pts + (pts - pts[idx[:, 1]]) / gap[:, None] * push
        self.seed_pos = pts
        self.seed_nn = cKDTree(pts).query(pts, k=2)[0][:, 1]

        # Neighbouring processes run alike: velocity is a smooth field plus a little jitter.
        flow_grid = gaussian_noise_field(rng, grid, 5.0 * d.cell_size_px / coarse)
        flow_grid2 = gaussian_noise_field(rng, grid, 5.0 * d.cell_size_px / coarse)
        gy = np.clip((pts[:, 0] / coarse).astype(int), 0, grid[0] - 1)
        gx = np.clip((pts[:, 1] / coarse).astype(int), 0, grid[1] - 1)
        flow = np.stack([flow_grid[gy, gx], flow_grid2[gy, gx]], 1)
        self.seed_vel = self.drift * (flow + 0.3 * rng.standard_normal((n, 2))) / np.sqrt(2)

        # A few cells start or end inside the volume (branches, terminals).
        life = d.cell_life_nm / d.section_thickness_nm
        p_event = 1.0 - np.exp(-max(self.n_slices - 1, 0) / life)
        self.seed_birth = np.where(
            rng.random(n) < p_event / 2, rng.uniform(0, self.n_slices, n), -np.inf
        )
        self.seed_death = np.where(
            rng.random(n) < p_event / 2, rng.uniform(0, self.n_slices, n), np.inf
        )
        self.seed_death = np.maximum(self.seed_death, self.seed_birth + life / 4)
        self.seed_tone = rng.standard_normal(n + 1).astype(np.float32)

    def _place_mitochondria(self, rng: np.random.Generator) -> None:
        """3-D capsules spread evenly over the image: width, aspect, z centre, half depth, and
        the owner cell (a live cell near the capsule at its z centre) with the offset in it."""
        d = self.d
        h, w = self.shape
        margin = d.mito_width_px  # profiles centred just outside the image still show
        area = (h + 2 * margin) * (w + 2 * margin)
        rz_median = max(0.5, d.mito_depth_nm / 2 / d.section_thickness_nm)
        span = self.n_slices - 1 + 2 * rz_median
        n = rng.poisson(d.mito_per_mpx * area / 1e6 * span / (2 * rz_median))
        width = d.mito_width_px * np.exp(d.mito_width_spread * rng.standard_normal(n))
        aspect = 1 + (d.mito_aspect - 1) * np.exp(d.mito_aspect_spread * rng.standard_normal(n))
        rz = rz_median * np.exp(0.3 * rng.standard_normal(n))
        z0 = rng.uniform(-rz, self.n_slices - 1 + rz)
        where = rng.random((n, 2)) * (h + 2 * margin, w + 2 * margin) + self.pad - margin
        # The inscribed disc of a Voronoi cell has half the nearest-seed distance as radius.
        # The owner is the roomiest of the three nearest cells; the mitochondrion moves towards
        # its seed until it fits (one wider than its cell swells it).
        inradius = self.seed_nn / 2 - d.membrane_thickness_px / 2 - d.mito_margin_px
        owner = np.zeros(n, int)
        zi = np.rint(np.clip(z0, 0, self.n_slices - 1))
        for z in np.unique(zi):
            sel = zi == z
            near = cKDTree(self.seed_pos + self.seed_vel * z).query(where[sel], k=3)[1]
            alive = (self.seed_birth[near] <= z) & (z < self.seed_death[near])
            score = np.where(alive, inradius[near], -np.inf)
            owner[sel] = near[np.arange(len(near)), np.argmax(score, axis=1)]
        zi = zi[:, None]
        offset = where - (self.seed_pos[owner] + self.seed_vel[owner] * zi)
        room = np.maximum(inradius[owner] - width / 2, 0)
        length = np.maximum(np.hypot(offset[:, 0], offset[:, 1]), 1e-6)
        offset *= (np.minimum(length, room) / length)[:, None]
        self.mito = {
            "width": width,
            "half_length": (aspect - 1) * width / 2,
            "rz": rz,
            "z0": z0,
            "angle": rng.uniform(0, np.pi, n),
            "owner": owner,
            "offset": offset,
            "phase": rng.random(n),
            "period": d.cristae_period_px * np.exp(0.15 * rng.standard_normal(n)),
        }

    # --- per slice ----------------------------------------------------------------------

    def _cells(self, z: int) -> np.ndarray:
        """Cell id per image pixel: Voronoi of the live seeds, sampled through the warp."""
        alive = (self.seed_birth <= z) & (z < self.seed_death)
        ids = np.flatnonzero(alive)
        pos = np.rint(self.seed_pos[ids] + self.seed_vel[ids] * z).astype(int)
        inside = (pos >= 0).all(1) & (pos[:, 0] < self.frame[0]) & (pos[:, 1] < self.frame[1])
        pos, ids = pos[inside], ids[inside]
        marker = np.ones(self.frame, bool)
        owner = np.zeros(self.frame, np.int32)
        marker[pos[:, 0], pos[:, 1]] = False
        owner[pos[:, 0], pos[:, 1]] = ids + 1
        _, (ny, nx) = ndi.distance_transform_edt(marker, return_indices=True)
        frame_cells = owner[ny, nx]

        d = self.d
        h, w = self.shape
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        wy = d.boundary_warp_px * self.warp_y.at(z) + d.boundary_wiggle_px * self.wiggle_y.at(z)
        wx = d.boundary_warp_px * self.warp_x.at(z) + d.boundary_wiggle_px * self.wiggle_x.at(z)
        py = np.clip(np.rint(yy + self.pad + wy), 0, self.frame[0] - 1).astype(np.intp)
        px = np.clip(np.rint(xx + self.pad + wx), 0, self.frame[1] - 1).astype(np.intp)
        return frame_cells[py, px]

    def geometry(self, z: int) -> Geometry:
        d = self.d
        cells = self._cells(z)
        spread = d.membrane_thickness_spread
        thickness = d.membrane_thickness_px * np.exp(
            spread * self.thickness.at(z) - spread**2 / 2
        )
        half = np.maximum(thickness - 1, 0) / 2
        # Mitochondria first: each claims room in its owner cell, so membranes wrap around it.
        mito_ids, mito_depth, centres = self._mitochondria(z, cells, half)
        boundary = np.zeros(self.shape, bool)
        boundary[:-1] |= cells[:-1] != cells[1:]
        boundary[:, :-1] |= cells[:, :-1] != cells[:, 1:]
        dist = ndi.distance_transform_edt(~boundary).astype(np.float32)
        # Opening the cell interiors with a disc rounds the corners of every cell.
        core = dist > half + d.corner_radius_px
        if core.any():
            interior = ndi.distance_transform_edt(~core) <= d.corner_radius_px
        else:
            interior = core
        membrane = ~interior
        membrane_distance = ndi.distance_transform_edt(interior).astype(np.float32)
        # The claimed room keeps mitochondria off membranes; this only trims rare leftovers
        # (where rounded corners reach in), and their outline follows the cut.
        mito_ids[membrane_distance <= d.mito_margin_px] = 0
        np.minimum(mito_depth, membrane_distance - d.mito_margin_px - 1, out=mito_depth)
        return Geometry(
            cells, membrane, dist, half, membrane_distance, mito_ids, mito_depth, centres
        )

    def _mitochondria(self, z, cells, half):
        """Cross-sections of the capsules at slice z; each one relabels a margin around it as
        its owner cell (modifies `cells`), so it always lies inside that cell."""
        d, m = self.d, self.mito
        h, w = self.shape
        mito_ids = np.zeros(self.shape, np.int32)
        mito_depth = np.zeros(self.shape, np.float32)
        claimed = np.zeros(self.shape, np.int32)  # owner id + 1 of each mitochondrion's room
        centres: dict[int, tuple[float, float]] = {}
        dz = (z - m["z0"]) / m["rz"]
        visible = np.flatnonzero(np.abs(dz) < 1)
        wobble = self.wiggle_y.at(z)
        wy, wx = self.warp_y.at(z), self.warp_x.at(z)
        for i in visible:
            scale = (1 - abs(dz[i]) ** 3) ** (1 / 3)
            radius = m["width"][i] / 2 * scale
            half_len = m["half_length"][i] * scale
            owner = m["owner"][i] + 1
            c = self.seed_pos[owner - 1] + self.seed_vel[owner - 1] * z + m["offset"][i] - self.pad
            # The cell was drawn through the warp: the pixel showing frame point c is c - warp.
            iy, ix = int(np.clip(c[0], 0, h - 1)), int(np.clip(c[1], 0, w - 1))
            c = c - (d.boundary_warp_px * wy[iy, ix], d.boundary_warp_px * wx[iy, ix])
            room = d.mito_margin_px + float(half[iy, ix]) + 1.5
            reach = half_len + radius + room + 1
            y0, y1 = max(0, int(c[0] - reach)), min(h, int(c[0] + reach) + 1)
            x0, x1 = max(0, int(c[1] - reach)), min(w, int(c[1] + reach) + 1)
            if y0 >= y1 or x0 >= x1:
                continue
            yy, xx = np.mgrid[y0:y1, x0:x1]
            cos, sin = np.cos(m["angle"][i]), np.sin(m["angle"][i])
            along = (yy - c[0]) * sin + (xx - c[1]) * cos
            across = -(yy - c[0]) * cos + (xx - c[1]) * sin
            dist = np.hypot(np.maximum(np.abs(along) - half_len, 0), across)
            dist -= radius * (1 + 0.06 * wobble[y0:y1, x0:x1])
            body, space = dist <= 0, dist <= room
            taken = claimed[y0:y1, x0:x1]
            others = mito_ids[y0:y1, x0:x1] > 0
            if (
                body.sum() < 12
                or ((taken > 0) & (taken != owner) & space).any()
                or (others & (dist <= 3)).any()
            ):
                continue  # a tiny cap, or it would touch or squeeze another mitochondrion
            mito_ids[y0:y1, x0:x1][body] = i + 1
            mito_depth[y0:y1, x0:x1][body] = -dist[body]
            taken[space] = owner
            cells[y0:y1, x0:x1][space] = owner
            centres[int(i)] = (float(c[0]), float(c[1]))
        return mito_ids, mito_depth, centres

    # --- rendering ----------------------------------------------------------------------

    def render(self, g: Geometry, z: int) -> np.ndarray:
        """Stain density of every structure, then the microscope: blur, gain, noise."""
        d = self.d
        rng = np.random.default_rng([self.seed, 1, z])
        shape = self.shape
        fine = gaussian_noise_field(rng, shape, d.texture_scale_px)
        medium = gaussian_noise_field(rng, shape, 4 * d.texture_scale_px)
        broad = gaussian_noise_field(rng, shape, 3 * d.texture_scale_px + 6)

        tone = d.cytoplasm_darkness + d.cell_tone_spread * self.seed_tone[g.cells]
        density = tone + d.texture_darkness * (0.7 * fine + 0.6 * medium)
        speckle = np.clip(fine * 0.6 + medium * 0.8 - 1.6, 0, None)
        density += d.speckle_darkness * speckle

        # Membranes: darkest at the boundary line, fading to the edge and in the junctions the
        # rounded corners leave; stain varies along them.
        half = np.maximum(g.half_thickness, 0.5)
        profile = np.clip(1.1 - 0.2 * g.boundary_distance / half, 0.75, 1)
        membrane_density = d.membrane_darkness * profile * (1 + 0.15 * broad)
        density = np.where(g.membrane, membrane_density, density)

        mito = g.mito_ids > 0
        if mito.any():
            density = self._render_mitochondria(g, density, mito, fine, medium)
        density = self._render_vesicles(rng, g, density, mito)

        intensity = 1.0 - density
        if d.blur_px > 0:
            intensity = ndi.gaussian_filter(intensity, d.blur_px)
        illum = 1 + d.illumination * gaussian_noise_field(rng, shape, max(shape) / 4)
        grey = (d.brightness - d.contrast * (1.0 - intensity)) * illum
        noise_std = np.sqrt(np.clip(grey, 0, None) * d.shot_noise + d.read_noise**2)
        noise = gaussian_noise_field(rng, shape, d.grain_px)
        grey = grey + noise * noise_std
        return np.clip(np.rint(grey), 0, 255).astype(np.uint8)

    def _render_mitochondria(self, g, density, mito, fine, medium):
        """Matrix, darker double membrane at the edge, cristae stripes across the long axis."""
        d, m = self.d, self.mito
        depth = g.mito_depth[mito]
        idx = g.mito_ids[mito] - 1
        ys, xs = np.nonzero(mito)
        centres = np.zeros((len(m["angle"]), 2))
        for i, c in g.mito_centres.items():
            centres[i] = c
        angle = m["angle"][idx]
        along = (ys - centres[idx, 0]) * np.sin(angle) + (xs - centres[idx, 1]) * np.cos(angle)
        bw = d.mito_border_px
        outer = depth <= bw
        inner = (depth > bw + 1.0) & (depth <= 2 * bw + 1.0)
        # Cristae: stripes across the long axis, bent and broken up by the texture noise.
        bend = 2.0 * medium[mito]
        wave = np.cos(2 * np.pi * (along / m["period"][idx] + m["phase"][idx]) + bend)
        cristae = (wave > 0.5) & (depth > 2 * bw + 2.0) & (fine[mito] > -0.8)
        value = (
            d.mito_darkness
            + 0.5 * d.texture_darkness * medium[mito]
            + d.mito_border_darkness * (outer + 0.8 * inner)
            + d.cristae_darkness * cristae
        )
        density = density.copy()
        density[mito] = value
        return density

    def _render_vesicles(self, rng, g, density, mito):
        """Small dark-rimmed circles in the cytoplasm, partly clustered (synaptic pools)."""
        d = self.d
        h, w = self.shape
        n_free = rng.poisson(d.vesicles_per_mpx * h * w / 1e6 * 0.4)
        n_clusters = rng.poisson(d.vesicles_per_mpx * h * w / 1e6 * 0.6 / 12)
        centres = [rng.random((n_free, 2)) * (h, w)]
        for c in rng.random((n_clusters, 2)) * (h, w):
            centres.append(c + rng.normal(0, 12, (rng.poisson(12), 2)))
        pts = np.rint(np.concatenate(centres)).astype(int)
        pts = pts[(pts >= 0).all(1) & (pts[:, 0] < h) & (pts[:, 1] < w)]
        if len(pts) == 0:
            return density
        radius = d.vesicle_radius_px * np.exp(0.25 * rng.standard_normal(len(pts)))
        free = ~g.membrane & ~ndi.binary_dilation(mito, iterations=2) if mito.any() else ~g.membrane
        ok = free[pts[:, 0], pts[:, 1]] & (g.membrane_distance[pts[:, 0], pts[:, 1]] > radius + 2)
        pts, radius = pts[ok], radius[ok]
        if len(pts) == 0:
            return density
        marker = np.ones(self.shape, bool)
        which = np.zeros(self.shape, np.int32)
        marker[pts[:, 0], pts[:, 1]] = False
        which[pts[:, 0], pts[:, 1]] = np.arange(len(pts))
        dist, (ny, nx) = ndi.distance_transform_edt(marker, return_indices=True)
        r = radius[which[ny, nx]]
        rim = np.exp(-(((dist - r) / 0.9) ** 2)) - 0.25 * (dist < r - 1)
        rim = np.where(free, rim, 0)
        return density + 0.35 * rim
