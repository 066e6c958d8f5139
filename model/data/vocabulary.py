"""The emoji scenes' objects: English names, their Twemoji characters and plurals.

Art: Twemoji graphics by Twitter, Inc and other contributors, licensed under CC-BY 4.0
(https://creativecommons.org/licenses/by/4.0/).
"""

import emoji as emoji_names

# name -> CLDR emoji name. Chosen to stay recognisable and mutually distinct at 16-36 px: one of
# each look-alike family (one clock, one heart, one red crustacean...); no people, smileys or flags.
_ENTRIES = (
    # animals
    ("cat", ":cat:"), ("dog", ":dog:"), ("mouse", ":mouse:"), ("rabbit", ":rabbit:"),
    ("fox", ":fox:"), ("bear", ":bear:"), ("panda", ":panda:"), ("tiger", ":tiger:"),
    ("lion", ":lion:"), ("cow", ":cow:"), ("pig", ":pig:"), ("frog", ":frog:"),
    ("monkey", ":monkey:"), ("chicken", ":chicken:"), ("penguin", ":penguin:"), ("bird", ":bird:"),
    ("duck", ":duck:"), ("owl", ":owl:"), ("flamingo", ":flamingo:"), ("swan", ":swan:"),
    ("snake", ":snake:"), ("turtle", ":turtle:"), ("crocodile", ":crocodile:"),
    ("dinosaur", ":sauropod:"), ("whale", ":spouting_whale:"), ("fish", ":fish:"),
    ("shark", ":shark:"), ("octopus", ":octopus:"), ("crab", ":crab:"), ("snail", ":snail:"),
    ("butterfly", ":butterfly:"), ("bee", ":honeybee:"), ("ladybug", ":lady_beetle:"),
    ("spider", ":spider:"), ("horse", ":horse:"), ("unicorn", ":unicorn:"), ("zebra", ":zebra:"),
    ("giraffe", ":giraffe:"), ("elephant", ":elephant:"), ("camel", ":two-hump_camel:"),
    ("kangaroo", ":kangaroo:"), ("hedgehog", ":hedgehog:"), ("sheep", ":ewe:"), ("deer", ":deer:"),
    ("jellyfish", ":jellyfish:"),
    # food and drink
    ("apple", ":red_apple:"), ("pear", ":pear:"), ("tangerine", ":tangerine:"),
    ("lemon", ":lemon:"), ("banana", ":banana:"), ("watermelon", ":watermelon:"),
    ("strawberry", ":strawberry:"), ("pineapple", ":pineapple:"), ("kiwi", ":kiwi_fruit:"),
    ("eggplant", ":eggplant:"), ("avocado", ":avocado:"), ("carrot", ":carrot:"),
    ("corn cob", ":ear_of_corn:"), ("chili pepper", ":hot_pepper:"),
    ("bell pepper", ":bell_pepper:"),
    ("cucumber", ":cucumber:"), ("mushroom", ":mushroom:"), ("potato", ":potato:"),
    ("croissant", ":croissant:"), ("baguette", ":baguette_bread:"), ("pretzel", ":pretzel:"),
    ("hamburger", ":hamburger:"), ("pizza", ":pizza:"), ("hot dog", ":hot_dog:"),
    ("sandwich", ":sandwich:"), ("taco", ":taco:"), ("burrito", ":burrito:"), ("egg", ":egg:"),
    ("fried egg", ":cooking:"), ("ice cream", ":soft_ice_cream:"), ("doughnut", ":doughnut:"),
    ("cookie", ":cookie:"), ("cake", ":birthday_cake:"), ("cupcake", ":cupcake:"),
    ("lollipop", ":lollipop:"), ("honey pot", ":honey_pot:"), ("coffee cup", ":hot_beverage:"),
    ("wine glass", ":wine_glass:"), ("beer mug", ":beer_mug:"),
    # vehicles
    ("car", ":automobile:"), ("bus", ":bus:"), ("ambulance", ":ambulance:"),
    ("fire engine", ":fire_engine:"), ("truck", ":delivery_truck:"), ("tractor", ":tractor:"),
    ("motorcycle", ":motorcycle:"), ("bicycle", ":bicycle:"), ("skateboard", ":skateboard:"),
    ("train", ":locomotive:"), ("airplane", ":airplane:"), ("helicopter", ":helicopter:"),
    ("rocket", ":rocket:"), ("flying saucer", ":flying_saucer:"), ("sailboat", ":sailboat:"),
    ("ship", ":ship:"), ("canoe", ":canoe:"),
    # plants
    ("sunflower", ":sunflower:"), ("rose", ":rose:"), ("tulip", ":tulip:"),
    ("cherry blossom", ":cherry_blossom:"), ("cactus", ":cactus:"), ("palm tree", ":palm_tree:"),
    ("pine tree", ":evergreen_tree:"), ("tree", ":deciduous_tree:"),
    ("clover", ":four_leaf_clover:"), ("maple leaf", ":maple_leaf:"), ("bouquet", ":bouquet:"),
    ("potted plant", ":potted_plant:"),
    # objects
    ("umbrella", ":umbrella:"), ("balloon", ":balloon:"), ("gift", ":wrapped_gift:"),
    ("key", ":key:"), ("lock", ":locked:"), ("bell", ":bell:"), ("light bulb", ":light_bulb:"),
    ("candle", ":candle:"), ("book", ":closed_book:"), ("envelope", ":envelope:"),
    ("pencil", ":pencil:"), ("hammer", ":hammer:"), ("axe", ":axe:"), ("telescope", ":telescope:"),
    ("camera", ":camera:"), ("telephone", ":telephone:"), ("laptop", ":laptop:"),
    ("television", ":television:"), ("guitar", ":guitar:"), ("trumpet", ":trumpet:"),
    ("drum", ":drum:"), ("soccer ball", ":soccer_ball:"), ("basketball", ":basketball:"),
    ("baseball", ":baseball:"), ("tennis ball", ":tennis:"), ("trophy", ":trophy:"),
    ("crown", ":crown:"), ("top hat", ":top_hat:"), ("shirt", ":t-shirt:"), ("dress", ":dress:"),
    ("sneaker", ":running_shoe:"), ("boot", ":woman’s_boot:"), ("ring", ":ring:"),
    ("gem", ":gem_stone:"), ("kite", ":kite:"), ("teddy bear", ":teddy_bear:"),
    ("puzzle piece", ":puzzle_piece:"), ("die", ":game_die:"), ("anchor", ":anchor:"),
    ("hourglass", ":hourglass_done:"), ("alarm clock", ":alarm_clock:"), ("house", ":house:"),
    ("castle", ":castle:"), ("moon", ":crescent_moon:"), ("sun", ":sun:"), ("star", ":star:"),
    ("cloud", ":cloud:"), ("rainbow", ":rainbow:"), ("snowflake", ":snowflake:"),
    ("snowman", ":snowman_without_snow:"), ("flame", ":fire:"),
    ("lightning bolt", ":high_voltage:"), ("droplet", ":droplet:"),
    ("globe", ":globe_showing_Europe-Africa:"), ("volcano", ":volcano:"),
    ("mountain", ":snow-capped_mountain:"), ("heart", ":red_heart:"), ("bomb", ":bomb:"),
    ("magnifying glass", ":magnifying_glass_tilted_left:"), ("game controller", ":video_game:"),
    ("package", ":package:"), ("money bag", ":money_bag:"), ("ghost", ":ghost:"),
    ("robot", ":robot:"), ("alien", ":alien:"), ("skull", ":skull:"), ("tooth", ":tooth:"),
    ("shell", ":spiral_shell:"),
)

# name -> emoji character
VOCABULARY = {name: emoji_names.emojize(cldr) for name, cldr in _ENTRIES}

_IRREGULAR_PLURALS = {
    "mouse": "mice", "fish": "fish", "jellyfish": "jellyfish",
    "sheep": "sheep", "deer": "deer", "potato": "potatoes", "volcano": "volcanoes",
    "cactus": "cacti", "maple leaf": "maple leaves", "tooth": "teeth", "die": "dice",
    "snowman": "snowmen",
}


def _regular_plural(name):
    if name.endswith(("s", "x", "z", "ch", "sh")):
        return name + "es"
    if name.endswith("y") and name[-2] not in "aeiou":
        return name[:-1] + "ies"
    return name + "s"


PLURALS = {name: _IRREGULAR_PLURALS.get(name) or _regular_plural(name) for name in VOCABULARY}
