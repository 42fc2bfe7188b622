"""A small VOCdevkit tree (annotation XMLs, ImageSets lists, JPEGImages) for builder tests."""

from __future__ import annotations

import dataclasses
import pathlib
import xml.etree.ElementTree as ET

import numpy as np
from image_fixture import write_image


@dataclasses.dataclass
class Obj:
    """One annotated object; difficult None leaves the <difficult> tag out."""

    name: str
    difficult: int | None = 0
    parts: tuple[str, ...] = ()


@dataclasses.dataclass
class Img:
    """One listed image: its objects and the kind of image file (None: no file, no XML)."""

    image_id: str
    objects: list[Obj] | None
    kind: str | None = "rgb"


def annotation_xml(year: str, image_id: str, objects: list[Obj]) -> str:
    """A VOC-style annotation document."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = f"VOC{year}"
    ET.SubElement(root, "filename").text = f"{image_id}.jpg"
    size = ET.SubElement(root, "size")
    for tag, value in (("width", 56), ("height", 40), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    ET.SubElement(root, "segmented").text = "0"
    for obj in objects:
        node = ET.SubElement(root, "object")
        ET.SubElement(node, "name").text = obj.name
        ET.SubElement(node, "pose").text = "Unspecified"
        ET.SubElement(node, "truncated").text = "0"
        if obj.difficult is not None:
            ET.SubElement(node, "difficult").text = str(obj.difficult)
        box = ET.SubElement(node, "bndbox")
        for tag, value in (("xmin", 2), ("ymin", 3), ("xmax", 30), ("ymax", 20)):
            ET.SubElement(box, tag).text = str(value)
        for part in obj.parts:
            p = ET.SubElement(node, "part")
            ET.SubElement(p, "name").text = part
            pbox = ET.SubElement(p, "bndbox")
            for tag, value in (("xmin", 4), ("ymin", 4), ("xmax", 9), ("ymax", 9)):
                ET.SubElement(pbox, tag).text = str(value)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode")


def write_voc(
    root: pathlib.Path, year: str, splits: dict[str, list[Img]]
) -> tuple[pathlib.Path, dict[str, np.ndarray | None]]:
    """Write VOCdevkit/VOC<year>; return (root, expected upright RGB per image id)."""
    base = root / "VOCdevkit" / f"VOC{year}"
    for folder in ("Annotations", "ImageSets/Main", "JPEGImages"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    pictures: dict[str, np.ndarray | None] = {}
    for split, imgs in splits.items():
        ids = [im.image_id for im in imgs]
        (base / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        for k, im in enumerate(imgs):
            if im.image_id in pictures:
                continue
            if im.objects is not None:
                xml = annotation_xml(year, im.image_id, im.objects)
                (base / "Annotations" / f"{im.image_id}.xml").write_text(xml)
            if im.kind is not None:
                pictures[im.image_id] = write_image(
                    base / "JPEGImages" / f"{im.image_id}.jpg", im.kind, k
                )
            else:
                pictures[im.image_id] = None
    return root, pictures
