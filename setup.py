from setuptools import find_packages, setup

setup(
    name="msf_monai",
    version="0.1.0",
    description="MixStyleFlow domain generalisation for medical image segmentation, as MONAI bundles",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["msf_monai", "msf_monai.*"]),
    install_requires=[
        "torch>=2.4",
        "monai>=1.4",
        "pytorch-ignite>=0.4.11",
        "nflows>=0.14",
        "numpy",
        "nibabel",
        "itk>=5.3",
        "fire",
        "pillow",
        "matplotlib",
        "pyyaml",
        "jsonschema",
        "tensorboard",
        "tqdm",
    ],
    extras_require={"test": ["pytest>=7", "pytest-xdist>=3"]},
)
