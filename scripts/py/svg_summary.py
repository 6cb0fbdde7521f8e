"""Parse an SVG with the standard library's XML parser and count its boxes by class.

usage: svg_summary.py FILE.svg
Prints {"rects": {class: count}, "titles": count} as JSON; fails on malformed XML.
"""
import collections
import json
import sys
import xml.etree.ElementTree as ET

root = ET.parse(sys.argv[1]).getroot()
ns = "{http://www.w3.org/2000/svg}"
assert root.tag == ns + "svg", root.tag
counts = collections.Counter(r.get("class", "") for r in root.iter(ns + "rect"))
titles = sum(1 for _ in root.iter(ns + "title"))
print(json.dumps({"rects": counts, "titles": titles}))
