"""Package discovery for setuptools; every other setting is in pyproject.toml. Beside the code
packages, the checkout's models/ folder installs as the package `morserve_models`, so wheels and
sdists carry the default model as package data (pyproject's `packages.find` cannot map a package
onto a folder of another name)."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["morserve", "morserve.*", "kernels", "kernels.*"]), "morserve_models"],
    package_dir={"morserve_models": "models"},
    package_data={"morserve_models": ["*/*"]},
)
