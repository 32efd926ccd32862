//! The device picker in the top bar: where training, Try it and personalisation compute. It
//! lists `auto`, the CPU and every GPU this binary can use, with the GPU's name and memory; the
//! choice is the form's `device` (saved with presets and runs).

use crate::device::{DeviceChoice, DeviceInfo};

/// What `auto` resolves to here: the first GPU, else the CPU.
fn auto_target(devices: &[DeviceInfo]) -> Option<&DeviceInfo> {
    devices
        .iter()
        .find(|d| d.choice != DeviceChoice::Cpu)
        .or_else(|| devices.first())
}

/// The text the closed picker shows.
pub fn selected_text(choice: DeviceChoice, devices: &[DeviceInfo]) -> String {
    match choice {
        DeviceChoice::Auto => match auto_target(devices) {
            Some(d) => format!("auto ({})", d.choice),
            None => "auto".into(),
        },
        c if devices.iter().any(|d| d.choice == c) => c.to_string(),
        c => format!("{c} (not available)"),
    }
}

/// Shows the picker; `devices` is [`crate::device::available`], read once at start.
pub fn show(ui: &mut egui::Ui, choice: &mut DeviceChoice, devices: &[DeviceInfo]) {
    let hover = match *choice {
        DeviceChoice::Auto => auto_target(devices).map(DeviceInfo::describe),
        c => devices
            .iter()
            .find(|d| d.choice == c)
            .map(DeviceInfo::describe),
    }
    .unwrap_or_else(|| match choice.resolve() {
        Ok(_) => choice.to_string(),
        Err(e) => e.to_string(),
    });
    egui::ComboBox::from_id_salt("device")
        .selected_text(selected_text(*choice, devices))
        .show_ui(ui, |ui| {
            let auto = match auto_target(devices) {
                Some(d) => format!("auto — {}", d.describe()),
                None => "auto".into(),
            };
            ui.selectable_value(choice, DeviceChoice::Auto, auto);
            for d in devices {
                ui.selectable_value(choice, d.choice, d.describe());
            }
        })
        .response
        .on_hover_text(hover);
    ui.label("Device:");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu() -> DeviceInfo {
        DeviceInfo {
            choice: DeviceChoice::Cpu,
            name: "Test CPU".into(),
            memory_bytes: None,
        }
    }

    #[test]
    fn auto_names_the_device_it_takes() {
        let gpu = DeviceInfo {
            choice: DeviceChoice::Cuda(0),
            name: "NVIDIA H200".into(),
            memory_bytes: Some(141 << 30),
        };
        assert_eq!(selected_text(DeviceChoice::Auto, &[cpu()]), "auto (cpu)");
        assert_eq!(
            selected_text(DeviceChoice::Auto, &[cpu(), gpu.clone()]),
            "auto (cuda:0)"
        );
        assert_eq!(gpu.describe(), "cuda:0 — NVIDIA H200 (141.0 GiB)");
        assert_eq!(
            selected_text(DeviceChoice::Cuda(1), &[cpu(), gpu]),
            "cuda:1 (not available)"
        );
    }
}
