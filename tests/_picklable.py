"""A module-level tracked function, for pickling tests (multiprocessing spawn pickles by name)."""

import inferscope


@inferscope.track_inference(model="picklable")
def predict(x):
    return x * 2
