"""iadkit: industrial image anomaly detection, offline and CPU-first.

Five lines from images to verdicts::

    import iadkit
    train, test = iadkit.load_dataset("synthetic:./synth", category="fabric")
    model = iadkit.Model.create("patchcore", image_size=224).fit(train)
    result = model.predict(test)
    model.save("fabric.iad")
"""

__version__ = "0.1.0"
