use candle_core::{DType, Device, Tensor, Var};
use std::time::Instant;
#[test]
#[ignore]
fn profile() {
    let x = Tensor::rand(0f32, 1f32, (128, 3, 224, 224), &Device::Cpu).unwrap();
    let w = Var::from_tensor(&Tensor::rand(-0.1f32, 0.1, (4, 3, 3, 3), &Device::Cpu).unwrap()).unwrap();
    let t = Instant::now();
    let y = x.conv2d(&w, 1, 1, 1, 1).unwrap();
    println!("conv fwd {:?}", t.elapsed());
    let t = Instant::now();
    let p = pipeline::cnn::max_pool2x2(&y).unwrap();
    println!("pool fwd {:?}", t.elapsed());
    let t = Instant::now();
    let g = p.sum_all().unwrap().backward().unwrap();
    println!("bwd {:?}", t.elapsed());
    let _ = g.get(&w).unwrap();
    let gy = Tensor::rand(0f32, 1f32, (128, 4, 224, 224), &Device::Cpu).unwrap();
    let t = Instant::now();
    let _ = x.transpose(0, 1).unwrap().conv2d(&gy.transpose(0, 1).unwrap(), 1, 1, 1, 1).unwrap();
    println!("kernel grad conv {:?}", t.elapsed());
    let t = Instant::now();
    let _ = gy.conv_transpose2d(&w, 1, 0, 1, 1).unwrap();
    println!("input grad convT {:?}", t.elapsed());
    let _ = DType::F32;
}
