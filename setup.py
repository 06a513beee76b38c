"""Setup for `entity_circuits`, read from nbdev's `settings.ini` (the one place metadata lives)."""
from configparser import ConfigParser

import setuptools

cfg = ConfigParser(delimiters=["="])
cfg.read("settings.ini", encoding="utf-8")
cfg = cfg["DEFAULT"]

requirements = cfg.get("requirements", "").split()
dev_requirements = cfg.get("dev_requirements", "").split()

setuptools.setup(
    name=cfg["lib_name"],
    version=cfg["version"],
    description=cfg["description"],
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    author=cfg["author"],
    license="Apache-2.0",
    keywords=cfg["keywords"].split(),
    python_requires=">=" + cfg["min_python"],
    packages=setuptools.find_packages(include=[cfg["lib_name"], cfg["lib_name"] + ".*"]),
    package_data={cfg["lib_name"]: ["assets/*", "assets/paper/*", "assets/paper/*/*"]},
    include_package_data=True,
    install_requires=requirements,
    extras_require={"dev": dev_requirements},
    zip_safe=False,
    entry_points={"console_scripts": cfg.get("console_scripts", "").split()},
)
