# Sensor arithmetic, apart from the pins so that it is tested on the host:
# medians for ADC oversampling, the SHT3x CRC-8 and conversion, ultrasonic
# distance to litres, float switch to litres, DS18B20 plausibility.


def median(values):
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def sht_crc8(data):
    # Sensirion CRC-8: poly 0x31, init 0xFF; sht_crc8(b"\xbe\xef") == 0x92
    crc = 0xFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x31) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def sht_convert(data):
    # The 6 bytes of an SHT3x single-shot measurement -> (air_temp, humidity),
    # or None when a CRC does not match.
    if len(data) != 6 or sht_crc8(data[0:2]) != data[2] or sht_crc8(data[3:5]) != data[5]:
        return None
    t_raw = (data[0] << 8) | data[1]
    rh_raw = (data[3] << 8) | data[4]
    humidity = 100.0 * rh_raw / 65535.0
    return -45.0 + 175.0 * t_raw / 65535.0, min(100.0, max(0.0, humidity))


ECHO_US_PER_CM = 58.0  # round trip in air at about 20 C


def echo_to_cm(us):
    return us / ECHO_US_PER_CM


def level_litres(distance_cm, empty_cm, l_per_cm, max_l=None):
    # The water level in litres, from the sensor's distance to the surface:
    # empty_cm is the distance to the bottom of an empty tank.
    litres = (empty_cm - distance_cm) * l_per_cm
    if litres < 0:
        litres = 0.0
    if max_l is not None and litres > max_l:
        litres = max_l
    return litres


def float_litres(level, active_low, on_l, off_l):
    # A float switch read as a level: on_l when the water reaches the switch.
    closed = (level == 0) if active_low else (level == 1)
    return on_l if closed else off_l


def ds_valid(celsius, first):
    # DS18B20: -55..125 C; 85.0 is the power-on value, not a reading, when it
    # comes first; -127 (or anything off range) means a lost sensor.
    if celsius is None or not -55.0 <= celsius <= 125.0:
        return False
    return not (first and celsius == 85.0)
