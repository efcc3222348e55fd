// The geometry elbo-shard applies to images and arrays, as units: channel conversion,
// centre crop, the bilinear resize on known values, the cover-then-crop policy, and
// the NHWC / NCHW inference. (Decoding itself is checked against PIL in
// test_image_dir.py.)
#include <gtest/gtest.h>

#include "elbo/data/array_sources.hpp"
#include "elbo/data/image_decode.hpp"
#include "elbo/util/error.hpp"

namespace elbo::data {
namespace {

Pixels gray(int h, int w, std::vector<uint8_t> v) { return Pixels{w, h, 1, std::move(v)}; }

TEST(ImageGeometry, ChannelConversionIsLumaAndReplication) {
  Pixels rgb{2, 1, 3, {255, 0, 0, 10, 20, 30}};
  Pixels g = convert_channels(rgb, 1);
  ASSERT_EQ(g.channels, 1);
  EXPECT_EQ(g.data, (std::vector<uint8_t>{76, 18}));  // (19595*255 + 32768) >> 16 = 76; (...) = 18
  Pixels back = convert_channels(g, 3);
  EXPECT_EQ(back.data, (std::vector<uint8_t>{76, 76, 76, 18, 18, 18}));
}

TEST(ImageGeometry, CenterCropFloorsOffsetsAndRefusesSmallImages) {
  Pixels p = gray(3, 4, {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11});
  Pixels c = center_crop(p, 2, "x.png");
  EXPECT_EQ(c.data, (std::vector<uint8_t>{1, 2, 5, 6}));  // rows from 0, columns from 1
  try {
    center_crop(p, 4, "x.png");
    ADD_FAILURE() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("x.png: image of 3 x 4 is smaller than --center-crop 4"), std::string::npos);
  }
}

TEST(ImageGeometry, BilinearResizeMatchesTheTriangleFilterByHand) {
  // 4 -> 2: scale 2, support 2; output 0 has taps 0..2 with weights 0.75, 0.75, 0.25
  // (normalized by 1.75), output 1 taps 1..3 with 0.25, 0.75, 0.75.
  Pixels p = gray(1, 4, {0, 100, 200, 255});
  Pixels r = resize_bilinear(p, 1, 2);
  EXPECT_EQ(r.data, (std::vector<uint8_t>{71, 209}));  // 125 / 1.75 = 71.4; (25 + 150 + 191.25) / 1.75 = 209.3
}

TEST(ImageGeometry, ResizeToTheSameSizeIsTheIdentity) {
  Pixels p = gray(2, 3, {9, 8, 7, 6, 5, 4});
  EXPECT_EQ(resize_bilinear(p, 2, 3).data, p.data);
  EXPECT_EQ(resize_cover_crop(p, 2, 3).data, p.data);
}

TEST(ImageGeometry, CoverThenCropKeepsTheAspectRatio) {
  Pixels p = gray(4, 8, std::vector<uint8_t>(32, 50));
  Pixels r = resize_cover_crop(p, 2, 2);  // 4 x 8 -> 2 x 4 -> centre 2 x 2
  EXPECT_EQ(r.height, 2);
  EXPECT_EQ(r.width, 2);
  EXPECT_EQ(r.data, std::vector<uint8_t>(4, 50));
}

TEST(ArrayGeometry, LayoutIsInferredOnlyWhenUnambiguous) {
  ArrayGeometry g = array_geometry({10, 32, 32, 3}, Layout::Auto, "a");
  EXPECT_TRUE(g.nhwc);
  EXPECT_EQ(g.c, 3u);
  g = array_geometry({10, 3, 32, 30}, Layout::Auto, "a");
  EXPECT_FALSE(g.nhwc);
  EXPECT_EQ(g.w, 30u);
  g = array_geometry({10, 28, 28}, Layout::Auto, "a");
  EXPECT_EQ(g.c, 1u);
  EXPECT_THROW(array_geometry({10, 3, 5, 3}, Layout::Auto, "a"), Error);
  EXPECT_EQ(array_geometry({10, 3, 5, 3}, Layout::NCHW, "a").h, 5u);
  EXPECT_THROW(array_geometry({10, 784}, Layout::Auto, "a"), Error);
  EXPECT_THROW(array_geometry({10, 0, 5}, Layout::Auto, "a"), Error);
  EXPECT_THROW(parse_layout("hwc"), Error);
}

}  // namespace
}  // namespace elbo::data
