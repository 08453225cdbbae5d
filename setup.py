"""Package metadata for alignbook, read from settings.ini (the nbdev 2.4 layout)."""
import shlex
from configparser import ConfigParser

import setuptools


config = ConfigParser(delimiters=["="])
config.read("settings.ini", encoding="utf-8")
cfg = config["DEFAULT"]

expected = ("version description keywords author author_email license status min_python "
            "audience language lib_name user").split()
missing = [key for key in expected if key not in cfg]
if missing:
    raise ValueError(f"settings.ini is missing the keys {missing}; add them to its [DEFAULT] section.")

licenses = {"apache2": ("Apache Software License 2.0", "OSI Approved :: Apache Software License")}
statuses = ["1 - Planning", "2 - Pre-Alpha", "3 - Alpha", "4 - Beta", "5 - Production/Stable",
            "6 - Mature", "7 - Inactive"]
python_versions = "3.10 3.11 3.12 3.13".split()
min_python = cfg["min_python"]
license_name, license_classifier = licenses[cfg["license"]]

requirements = shlex.split(cfg.get("requirements", ""))
dev_requirements = shlex.split(cfg.get("dev_requirements", ""))
console_scripts = cfg.get("console_scripts", "").split()

setuptools.setup(
    name=cfg["lib_name"],
    version=cfg["version"],
    license=license_name,
    classifiers=[
        "Development Status :: " + statuses[int(cfg["status"])],
        "Intended Audience :: " + cfg["audience"],
        "License :: " + license_classifier,
        "Natural Language :: " + cfg["language"],
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ] + ["Programming Language :: Python :: " + v for v in python_versions[python_versions.index(min_python):]],
    url=cfg["git_url"],
    packages=setuptools.find_packages(include=["alignbook", "alignbook.*"]),
    include_package_data=True,
    install_requires=requirements,
    extras_require={"dev": dev_requirements},
    python_requires=">=" + min_python,
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    zip_safe=False,
    entry_points={"console_scripts": console_scripts, "nbdev": [f"{cfg['lib_name']}={cfg['lib_name']}._modidx:d"]},
    author=cfg["author"],
    author_email=cfg["author_email"],
    description=cfg["description"],
    keywords=cfg["keywords"],
)
