"""Small camera files the tests write themselves: DNG (camera RAW, with pidng) and videos.

None is committed: every test builds the files it needs in its tmp_path.
"""
import cv2
import numpy as np


# XYZ (D65) to linear sRGB, row by row (IEC 61966-2-1).
XYZ_TO_LINEAR_SRGB = (3.2406, -1.5372, -0.4986, -0.9689, 1.8758, 0.0415, 0.0557, -0.2040, 1.0570)


def write_dng(path, scene, neutral=(1.0, 1.0, 1.0), make="Testmaker", model="Bench 1", bits=12,
              datetime_original=None, lens=None):
    """Write ``scene`` (float HxWx3 camera RGB in [0, 1], H and W even) as an RGGB Bayer DNG.

    neutral: the as-shot neutral (camera RGB of a grey object), which LibRaw
    turns into the camera white balance 1 / neutral. The colour matrix (XYZ to
    camera) is that of linear sRGB: camera RGB is linear sRGB."""
    import pidng.core
    from pidng.defs import (CalibrationIlluminant, CFAPattern, DNGVersion, Orientation, PhotometricInterpretation,
                            PreviewColorSpace)
    from pidng.dng import DNGTags, Tag
    h, w = scene.shape[:2]
    top = (1 << bits) - 1
    values = np.clip(np.rint(np.asarray(scene, np.float64) * top), 0, top).astype(np.uint16)
    mosaic = np.empty((h, w), np.uint16)
    mosaic[0::2, 0::2] = values[0::2, 0::2, 0]
    mosaic[0::2, 1::2] = values[0::2, 1::2, 1]
    mosaic[1::2, 0::2] = values[1::2, 0::2, 1]
    mosaic[1::2, 1::2] = values[1::2, 1::2, 2]
    tags = DNGTags()
    for tag, value in ((Tag.ImageWidth, w), (Tag.ImageLength, h), (Tag.TileWidth, w), (Tag.TileLength, h),
                       (Tag.Orientation, Orientation.Horizontal),
                       (Tag.PhotometricInterpretation, PhotometricInterpretation.Color_Filter_Array),
                       (Tag.SamplesPerPixel, 1), (Tag.BitsPerSample, bits), (Tag.CFARepeatPatternDim, [2, 2]),
                       (Tag.CFAPattern, CFAPattern.RGGB), (Tag.BlackLevel, 0), (Tag.WhiteLevel, top),
                       (Tag.ColorMatrix1, [[round(v * 10000), 10000] for v in XYZ_TO_LINEAR_SRGB]),
                       (Tag.CalibrationIlluminant1, CalibrationIlluminant.D65),
                       (Tag.AsShotNeutral, [[int(round(v * 10000)), 10000] for v in neutral]),
                       (Tag.Make, make), (Tag.Model, model),
                       (Tag.DNGVersion, DNGVersion.V1_4), (Tag.DNGBackwardVersion, DNGVersion.V1_2),
                       (Tag.PreviewColorSpace, PreviewColorSpace.sRGB)):
        tags.set(tag, value)
    if datetime_original:
        tags.set(Tag.DateTimeOriginal, datetime_original)
    if lens:
        tags.set(Tag.EXIFPhotoLensModel, lens)
    writer = pidng.core.RAW2DNG()
    writer.options(tags, path="", compress=False)
    path.write_bytes(bytes(writer.convert(mosaic)))
    return path


def grey_card_scene(h=32, w=48, level=0.5, neutral=(1.0, 1.0, 1.0)):
    """A horizontal ramp of a grey object as the camera sees it under an illuminant
    whose neutral is ``neutral``: camera RGB = level * ramp * neutral."""
    ramp = np.linspace(0.2, 1.0, w)[None, :, None] * np.ones((h, 1, 1))
    return ramp * level * np.asarray(neutral, np.float64)[None, None, :]


def write_video(path, frames, fourcc="FFV1", fps=10):
    """Write uint8 HxWx3 BGR ``frames`` with OpenCV (FFV1 in .avi is lossless)."""
    h, w = frames[0].shape[:2] if frames else (48, 64)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (w, h))
    for frame in frames:
        writer.write(frame)
    writer.release()
    return path
