"""Web image data: the WebVision-layout reader, image datasets, and the synthetic default data set."""
from megaclass.data.dataset import ClassBalancedSampler, ImageDataset
from megaclass.data.webvision import TrainRecord, WebVision, WebVisionFormatError, load_webvision

__all__ = ["ClassBalancedSampler", "ImageDataset", "TrainRecord", "WebVision", "WebVisionFormatError",
           "load_webvision"]
